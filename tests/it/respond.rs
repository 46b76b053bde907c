//! Automated response on the real broker: attacks → alerts → commands; device acks
//! reconcile desired and reported state; silence raises expiry alerts; unapproved
//! firmware is its own verdict; analyst feedback suspends and resumes automation;
//! the signed audit trail verifies across a restart and names tampered records.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::Path;
use std::process::Command as Proc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdkafka::message::OwnedMessage;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::Message;
use serde_json::{json, Value};
use twinguard::config::Config;
use twinguard::kafka::{self, NewTopicSpec};
use twinguard::tools::sim::{SimRecord, Simulator, Truth};
use twinguard_operators::Twin;
use twinguard_schemas::respond::{Ack, AckStatus, Action, Alert, AlertKind, Command, FeedbackLabel, CLASS_FIRMWARE_TAMPER};
use twinguard_schemas::verdict::Verdict;

use crate::harness::*;

fn parse<T: serde::de::DeserializeOwned>(m: &OwnedMessage) -> T {
    serde_json::from_slice(m.payload().expect("payload")).expect("contract record")
}

fn producer(cfg: &Config) -> ThreadedProducer<DefaultProducerContext> {
    kafka::producer_config(cfg).create().unwrap()
}

fn send(p: &ThreadedProducer<DefaultProducerContext>, topic: &str, partition: Option<i32>, key: &str, value: &[u8]) {
    let mut r = BaseRecord::to(topic).key(key).payload(value);
    if let Some(p) = partition {
        r = r.partition(p);
    }
    p.send(r).map_err(|(e, _)| e).unwrap();
}

/// Registry and signing key files next to the config; returns the public key.
fn respond_files(dir: &Path, cfg: &mut Config, registry: &[twinguard_schemas::respond::RegistryEntry]) -> String {
    let entries: Vec<String> =
        registry.iter().map(|e| toml::to_string(&BTreeMap::from([("device", vec![e])])).unwrap()).collect();
    std::fs::write(dir.join("registry.toml"), entries.concat()).unwrap();
    let key = dir.join("audit.key");
    let out = Proc::new(env!("CARGO_BIN_EXE_twinguard")).args(["audit", "keygen", "--out"]).arg(&key).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    cfg.registry.file = Some(dir.join("registry.toml"));
    cfg.audit.signing_key_file = Some(key);
    text.lines().find_map(|l| l.strip_prefix("public key: ")).expect("keygen prints the public key").to_string()
}

fn audit_verify(config: &Path, extra: &[&str]) -> (bool, String) {
    let out = Proc::new(env!("CARGO_BIN_EXE_twinguard")).args(["audit", "verify", "--config"]).arg(config).args(extra).output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

// Kept whole: one scenario on one broker (attack, alert, command, ack, silence,
// firmware); each step depends on the state the steps before left.
#[test]
fn attacks_alert_and_command_acks_reconcile_silence_expires_firmware_is_checked() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("respond");
    let mut sc = sim_config(24, 6000, 5);
    sc.attacked_fraction = 0.9;
    let sim = Simulator::new(sc);
    respond_files(&dir, &mut cfg, &sim.registry());
    let recs: Vec<SimRecord> = sim.collect();
    let firmware_attacks: BTreeSet<String> =
        recs.iter().filter(|r| matches!(r.truth, Truth::Attack(k) if k.as_str() == "firmware_change")).map(|r| r.key.clone()).collect();
    assert!(!firmware_attacks.is_empty(), "the fixture must tamper with some firmware");
    cfg.response.command_ttl_secs = 20;
    cfg.batch.expiry_interval_secs = 1;
    // The test's backlog counts as response time; keep slowness from gating here.
    cfg.gating.max_response_ms = 1e9;
    let config = write_config(&dir, "pipeline", &cfg);
    let mut p = PipelineProc::start(&dir, "pipeline", &config);

    // The devices' agents: acknowledge every other command as it arrives.
    let stop = Arc::new(AtomicBool::new(false));
    let seen: Arc<Mutex<Vec<(Command, bool)>>> = Arc::default();
    let agent = {
        let (cfg, stop, seen) = (cfg.clone(), stop.clone(), seen.clone());
        std::thread::spawn(move || {
            let prod = producer(&cfg);
            let mut commands = Reader::new(&cfg, &cfg.topics.commands);
            let mut done = 0;
            while !stop.load(Ordering::Relaxed) {
                commands.try_until(Duration::from_millis(200), |recs| {
                    for m in &recs[done..] {
                        let c: Command = parse(m);
                        let ack = seen.lock().unwrap().len() % 2 == 0;
                        if ack {
                            let a = Ack { v: 1, command_id: c.command_id.clone(), device_id: c.device_id.clone(), status: AckStatus::Applied, reported: Default::default(), mac: None };
                            send(&prod, &cfg.topics.acks, None, &c.device_id, &serde_json::to_vec(&a).unwrap());
                        }
                        seen.lock().unwrap().push((c, ack));
                    }
                    done = recs.len();
                    false
                });
            }
            prod.flush(Duration::from_secs(10)).unwrap();
        })
    };
    produce(&cfg, &recs);
    let valid = recs.iter().filter(|r| !matches!(r.truth, Truth::Malformed(_))).count();
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    verdicts.until("a verdict for every event", |r| r.len() >= valid);
    // Every unacknowledged command raises exactly one expiry alert.
    let mut alerts = Reader::new(&cfg, &cfg.topics.alerts);
    alerts.until("an expiry alert for every unacknowledged command", |r| {
        let expired = r.iter().filter(|m| parse::<Alert>(m).kind == AlertKind::CommandUnacknowledged).count();
        let unacked = seen.lock().unwrap().iter().filter(|(_, a)| !a).count();
        unacked > 0 && expired >= unacked
    });
    p.wait_log(&["command acknowledged"]);
    stop.store(true, Ordering::Relaxed);
    agent.join().unwrap();
    // Let the last acks land before stopping (each is logged once applied).
    let acked: Vec<Command> = seen.lock().unwrap().iter().filter(|(_, a)| *a).map(|(c, _)| c.clone()).collect();
    let unacked: HashSet<String> = seen.lock().unwrap().iter().filter(|(_, a)| !a).map(|(c, _)| c.command_id.clone()).collect();
    for _ in 1..acked.len() {
        p.wait_log(&["command acknowledged"]);
    }
    p.stop();
    alerts.drain_to_end(&cfg, &cfg.topics.alerts);
    verdicts.drain_to_end(&cfg, &cfg.topics.verdicts);

    let alerts: Vec<Alert> = alerts.records.iter().map(parse).collect();
    let commands: Vec<Command> = seen.lock().unwrap().iter().map(|(c, _)| c.clone()).collect();
    // Attack events produced alerts, and some alerts commands.
    let detections: Vec<&Alert> = alerts.iter().filter(|a| a.kind == AlertKind::Detection).collect();
    assert!(detections.len() >= 10, "only {} detection alerts", detections.len());
    assert!(commands.len() >= 3, "only {} commands", commands.len());
    // A command per (incident, action) at most: repeated alerts never repeat it.
    let ids: HashSet<&str> = commands.iter().map(|c| c.command_id.as_str()).collect();
    assert_eq!(ids.len(), commands.len(), "a command was repeated");
    for c in &commands {
        let a = detections.iter().find(|a| a.alert_id == c.reason.alert_id).expect("every command answers an alert");
        assert_eq!(a.response.command_id.as_deref(), Some(c.command_id.as_str()));
        assert!(a.response.automated);
        assert_eq!(c.desired.len(), 1, "{c:?}");
        assert!(c.expires_at > c.issued_at);
    }
    // Life-critical devices (the registry says which) are never isolated automatically.
    for a in &detections {
        if a.criticality == Some(twinguard_schemas::respond::Criticality::LifeCritical) {
            assert_ne!(a.response.action, Action::Isolate, "{a:?}");
            if a.response.rule == "near-certain" {
                assert_eq!(a.response.action, Action::Escalate);
                assert!(a.response.needs_human && a.response.command_id.is_none());
            }
        }
    }
    assert!(commands.iter().all(|c| c.action != Action::Isolate || !c.device_id.contains("pump") && !c.device_id.contains("ventilator")));
    // Firmware tampering: a verdict of its own, answered by the configured command (safe mode).
    let vs: Vec<Verdict> = verdicts.records.iter().map(parse).collect();
    for d in &firmware_attacks {
        assert!(
            vs.iter().any(|v| &v.device_id == d && v.attack_class.as_deref() == Some(CLASS_FIRMWARE_TAMPER) && v.anomalous),
            "no firmware_tamper verdict for {d}"
        );
        assert!(commands.iter().any(|c| &c.device_id == d && c.action == Action::SafeMode), "no safe-mode command for {d}");
    }
    assert!(vs.iter().filter(|v| v.attack_class.as_deref() == Some(CLASS_FIRMWARE_TAMPER)).all(|v| firmware_attacks.contains(&v.device_id)));
    // Expiry alerts name exactly the commands never acknowledged.
    let expired: HashSet<String> =
        alerts.iter().filter(|a| a.kind == AlertKind::CommandUnacknowledged).map(|a| a.command_id.clone().unwrap()).collect();
    assert_eq!(expired, unacked);
    // Data minimisation: vital signs appear as deviations only.
    for a in &detections {
        for f in &a.features {
            if f.phi {
                assert!(f.value.is_none() && f.baseline_mean.is_none(), "{f:?}");
            }
        }
    }
    // Desired vs reported in the twins (from the changelog): for each device and
    // state key, the last command decides: acknowledged → reported == desired;
    // unacknowledged → the desired value stays, so the delta shows it.
    let twins: BTreeMap<String, Twin> =
        changelog_twins(&cfg).into_iter().map(|(k, v)| (k.clone(), Twin::decode(&k, &v).unwrap())).collect();
    let mut last: BTreeMap<(String, String), (String, bool)> = BTreeMap::new();
    for (c, was_acked) in seen.lock().unwrap().iter() {
        for (k, v) in &c.desired {
            last.insert((c.device_id.clone(), k.clone()), (v.clone(), *was_acked));
        }
    }
    let mut open = 0;
    for ((device, k), (v, was_acked)) in &last {
        let r = twins[device].response();
        assert_eq!(r.desired.get(k), Some(v), "{device}: desired `{k}`");
        if *was_acked {
            assert_eq!(r.reported.get(k), Some(v), "{device} reports its acknowledged `{k}`");
        } else {
            open += usize::from(r.delta().contains_key(k));
        }
        assert!(r.pending.is_empty(), "{device}: every command was acknowledged or expired");
    }
    assert!(open > 0, "an unreached desired state stays visible as a delta");
}

/// A normal record turned into a flood from the same device (metrics ×200).
fn flood(r: &SimRecord) -> SimRecord {
    let mut v: Value = serde_json::from_slice(&r.payload).unwrap();
    for k in ["src_bytes", "dst_bytes", "src_load", "dst_load", "src_pkts", "dst_pkts", "tot_pkts", "tot_bytes", "load", "rate"] {
        if let Some(x) = v.get(k).and_then(Value::as_f64) {
            v[k] = json!(x * 200.0 + 1000.0);
        }
    }
    SimRecord { payload: serde_json::to_vec(&v).unwrap(), ..r.clone() }
}

fn feedback(p: &ThreadedProducer<DefaultProducerContext>, cfg: &Config, n: usize, label: FeedbackLabel, tag: &str) {
    for i in 0..n {
        let fb = json!({"v": 1, "ref": format!("{tag}-{i}"), "label": label, "analyst": "it"});
        send(p, &cfg.topics.feedback, None, tag, &serde_json::to_vec(&fb).unwrap());
    }
    p.flush(Duration::from_secs(10)).unwrap();
}

// Kept whole: one scenario on one broker in the order an operator lives it
// (alerts, feedback, suspension, restart, audit verification); each step depends on
// the state the steps before left.
#[test]
fn feedback_gates_automation_and_the_audit_trail_proves_itself() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("gating");
    let mut sc = sim_config(8, 2400, 9);
    sc.attacked_fraction = 0.0;
    let sim = Simulator::new(sc);
    let public_key = respond_files(&dir, &mut cfg, &sim.registry());
    let recs: Vec<SimRecord> = sim.collect();
    // Three attacks on non-life-critical devices, one per phase.
    let target = |from: usize| {
        (from..recs.len()).find(|&i| recs[i].key.contains("monitor") || recs[i].key.contains("oximeter")).unwrap()
    };
    let phases = [(0, 1200), (1200, 1800), (1800, 2400)];
    let attacked: Vec<usize> = phases.iter().map(|(a, b)| target(a + (b - a) / 2)).collect();
    let phase = |k: usize| -> Vec<SimRecord> {
        let (a, b) = phases[k];
        (a..b).map(|i| if attacked.contains(&i) { flood(&recs[i]) } else { recs[i].clone() }).collect()
    };
    // Every alert asks for a rate limit (a command), whatever its score.
    cfg.response.rules = vec![twinguard_operators::respond::Rule {
        name: "any".into(),
        classes: vec![],
        device_types: vec![],
        criticality: vec![],
        min_score: None,
        action: Action::RateLimit,
    }];
    cfg.gating.min_labels = 5;
    cfg.gating.window = 50;
    cfg.gating.max_fpr = 0.3;
    cfg.gating.min_precision = 0.0;
    cfg.gating.max_response_ms = 1e9;
    // Each phase's attack is an incident of its own.
    cfg.response.incident_quiet_secs = 1;
    let config = write_config(&dir, "pipeline", &cfg);
    let prod = producer(&cfg);
    let mut p = PipelineProc::start(&dir, "pipeline", &config);
    let mut alerts = Reader::new(&cfg, &cfg.topics.alerts);
    let coords: Arc<Mutex<Vec<Vec<(i32, i64)>>>> = Arc::default();
    let detection = |m: &OwnedMessage, i: usize| {
        let a: Alert = parse(m);
        let (a_from, _) = phases[i];
        let want = coords.lock().unwrap().get(i).map(|c| c[attacked[i] - a_from]);
        let at = a.source.as_ref().map(|s| (s.partition, s.offset));
        (a.kind == AlertKind::Detection && want.is_some() && at == want).then_some(a)
    };
    let wait_alert = |alerts: &mut Reader, i: usize| -> Alert {
        alerts.until("the phase's attack alert", |r| r.iter().any(|m| detection(m, i).is_some()));
        alerts.records.iter().rev().find_map(|m| detection(m, i)).unwrap()
    };

    // Phase 1: automation on: the attack is answered by a command.
    coords.lock().unwrap().push(produce(&cfg, &phase(0)));
    let a1 = wait_alert(&mut alerts, 0);
    assert!(a1.response.automated && a1.response.command_id.is_some(), "{a1:?}");
    // Analysts mark five alerts as false positives: FPR 1.0 > 0.3 → suspended.
    feedback(&prod, &cfg, 5, FeedbackLabel::FalsePositive, "fp");
    p.wait_log(&["SUSPENDED"]);
    // Phase 2: the alert still flows, marked for a human; no command.
    coords.lock().unwrap().push(produce(&cfg, &phase(1)));
    let a2 = wait_alert(&mut alerts, 1);
    assert!(a2.response.suspended && a2.response.needs_human && !a2.response.automated && a2.response.command_id.is_none(), "{a2:?}");
    // Benign confirmations bring FPR to 5/25 = 0.2 ≤ 0.3: resumed.
    feedback(&prod, &cfg, 20, FeedbackLabel::TrueNegative, "tn");
    p.wait_log(&["resumed"]);
    // A malformed feedback record goes to the DLQ, it does not stop anything.
    send(&prod, &cfg.topics.feedback, None, "x", b"{\"v\":1,\"ref\":\"a\",\"label\":\"maybe\"}");
    prod.flush(Duration::from_secs(10)).unwrap();
    let mut dlq = Reader::new(&cfg, &cfg.topics.dlq);
    dlq.until("the bad feedback dead-lettered", |r| r.iter().any(|m| m.payload() == Some(&b"{\"v\":1,\"ref\":\"a\",\"label\":\"maybe\"}"[..])));
    // Restart in the middle: the chain continues from the topic's tail.
    p.stop();
    let mut p = PipelineProc::start(&dir, "pipeline2", &config);
    // Phase 3: automation is back (the gate is rebuilt from the feedback topic).
    coords.lock().unwrap().push(produce(&cfg, &phase(2)));
    let a3 = wait_alert(&mut alerts, 2);
    assert!(a3.response.automated && a3.response.command_id.is_some(), "{a3:?}");
    p.stop();

    // The untouched trail verifies, across the restart, with the public key alone.
    let (ok, out) = audit_verify(&config, &["--public-key", &public_key]);
    assert!(ok, "{out}");
    assert!(out.contains("verified"), "{out}");
    let chains = kafka::read_all(&cfg, &cfg.topics.audit, Duration::from_secs(60)).unwrap();
    let kinds: Vec<String> = chains
        .values()
        .flatten()
        .map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    for k in ["verdict", "command", "policy_suspended", "policy_resumed"] {
        assert!(kinds.iter().any(|x| x == k), "no `{k}` record in the audit trail: {kinds:?}");
    }
    let (&part, records) = chains.iter().max_by_key(|(_, r)| r.len()).unwrap();
    assert!(records.len() >= 3, "{records:?}");

    // Tampered copies: each fails and names the record.
    let copy = |name: &str, recs: Vec<Vec<u8>>| -> String {
        let topic = format!("{}.{name}", cfg.topics.audit);
        let n = cfg.topics.partitions;
        kafka::create_topics(&cfg, &[NewTopicSpec { name: topic.clone(), partitions: n, compact: false }]).unwrap();
        for b in &recs {
            send(&prod, &topic, Some(part), "", b);
        }
        prod.flush(Duration::from_secs(10)).unwrap();
        topic
    };
    let original: Vec<Vec<u8>> = records.iter().map(|(_, b)| b.clone()).collect();
    let edit = |b: &[u8], f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_slice(b).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    };
    let mut modified = original.clone();
    modified[1] = edit(&modified[1], &|v| v["at"] = json!("2020-01-01T00:00:00.000Z"));
    let mut dropped = original.clone();
    dropped.remove(1);
    let mut reordered = original.clone();
    reordered.swap(1, 2);
    // A forger re-hashes the edited record and signs it with a key of their own.
    let forged_key = dir.join("forger.key");
    assert!(Proc::new(env!("CARGO_BIN_EXE_twinguard")).args(["audit", "keygen", "--out"]).arg(&forged_key).output().unwrap().status.success());
    let mut forged = original.clone();
    forged[1] = {
        let mut v: Value = serde_json::from_slice(&original[1]).unwrap();
        v["device_id"] = json!("someone-else");
        let h = twinguard_operators::audit::record_hash(&v);
        v["hash"] = json!(twinguard_operators::audit::hex(&h));
        let seed = twinguard_operators::audit::parse_key_hex(&std::fs::read_to_string(&forged_key).unwrap()).unwrap();
        use ed25519_dalek::Signer;
        let sig = ed25519_dalek::SigningKey::from_bytes(&seed).sign(&h);
        v["sig"] = json!(twinguard_operators::audit::hex(&sig.to_bytes()));
        serde_json::to_vec(&v).unwrap()
    };
    for (name, recs, why, seq) in [
        ("modified", modified, "altered", 1),
        ("dropped", dropped, "removed", 2),
        ("reordered", reordered, "reordered", 2),
        ("forged", forged, "forged", 1),
    ] {
        let topic = copy(name, recs);
        let (ok, out) = audit_verify(&config, &["--topic", &topic, "--public-key", &public_key]);
        assert!(!ok, "{name}: a tampered trail verified: {out}");
        // The first bad record sits at offset 1 of the copy in every case.
        let want = format!("partition {part}), record at offset 1 (seq {seq}): {why}");
        assert!(out.contains(&want), "{name}: expected `{want}` in: {out}");
    }
}

/// Produce `values` to one partition in as few broker batches as the producer makes
/// (it lingers 500 ms), unlike the harness's one record per batch.
fn produce_in_one_batch(cfg: &Config, topic: &str, partition: i32, values: &[Vec<u8>]) {
    let mut c = cfg.clone();
    c.kafka.producer.insert("linger.ms".into(), "500".into());
    c.kafka.producer.insert("batch.num.messages".into(), "100000".into());
    let p = producer(&c);
    for v in values {
        send(&p, topic, Some(partition), "", v);
    }
    p.flush(Duration::from_secs(30)).unwrap();
}

/// Audit-shaped records (the tail read does not verify them).
fn audit_like(from: u64, n: u64) -> Vec<Vec<u8>> {
    (from..from + n).map(|seq| serde_json::to_vec(&json!({"v": 1, "chain": 0, "seq": seq, "kind": "verdict", "body": {"pad": "x".repeat(200)}})).unwrap()).collect()
}

#[test]
fn the_audit_tail_is_read_when_the_last_batch_holds_many_records() {
    let Setup { dir: _dir, broker: _broker, cfg } = Setup::new("audittail");
    let topic = cfg.topics.audit.clone();
    // A few records one per batch, then batches of several: tansu 0.6 serves a fetch
    // that starts inside a stored batch from the next batch, so reading from the
    // last offset alone finds nothing there.
    let seq_of = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap()["seq"].as_u64().unwrap();
    let mut next = 0;
    for _ in 0..3 {
        produce_in_one_batch(&cfg, &topic, 0, &audit_like(next, 1));
        next += 1;
    }
    for n in [5, 400] {
        produce_in_one_batch(&cfg, &topic, 0, &audit_like(next, n));
        next += n;
        let tail = kafka::read_tail(&cfg, &topic, 0, Duration::from_secs(60)).unwrap().expect("the partition holds records");
        assert_eq!(seq_of(&tail), next - 1, "the tail is the last record written");
    }
    // An empty partition has no tail.
    assert_eq!(kafka::read_tail(&cfg, &topic, 1, Duration::from_secs(60)).unwrap(), None);
}

#[test]
fn audit_verify_needs_a_pinned_public_key() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("auditpin");
    respond_files(&dir, &mut cfg, &[]);
    let config = write_config(&dir, "pipeline", &cfg);
    // The signing key is on every host: a key derived from it proves nothing.
    let (ok, out) = audit_verify(&config, &[]);
    assert!(!ok, "verified without a pinned public key: {out}");
    assert!(out.contains("--public-key") && out.contains("audit.public_key"), "{out}");
}

/// `twinguard audit keygen --out path`; returns the public key it prints.
fn keygen(path: &Path) -> String {
    let out = Proc::new(env!("CARGO_BIN_EXE_twinguard")).args(["audit", "keygen", "--out"]).arg(path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().lines().find_map(|l| l.strip_prefix("public key: ")).expect("keygen prints the public key").to_string()
}

fn kinds(recs: &[(i64, Vec<u8>)]) -> Vec<String> {
    recs.iter().map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["kind"].as_str().unwrap().to_string()).collect()
}

#[test]
fn a_rotated_signing_key_takes_over_and_the_trail_verifies_from_the_pinned_first_key() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("rotation");
    let mut sc = sim_config(8, 1600, 13);
    sc.attacked_fraction = 0.9;
    let sim = Simulator::new(sc);
    let first_public = respond_files(&dir, &mut cfg, &sim.registry());
    let recs: Vec<SimRecord> = sim.collect();
    cfg.gating.max_response_ms = 1e9;
    let (a, b) = recs.split_at(recs.len() / 2);
    let valid = |r: &[SimRecord]| r.iter().filter(|r| !matches!(r.truth, Truth::Malformed(_))).count();
    let mut verdicts = Reader::new(&cfg, &cfg.topics.verdicts);
    let mut p = PipelineProc::start(&dir, "first", &write_config(&dir, "first", &cfg));
    produce(&cfg, a);
    verdicts.until("verdicts of the first half", |r| r.len() >= valid(a));
    p.stop();
    let before = kafka::read_all(&cfg, &cfg.topics.audit, Duration::from_secs(60)).unwrap();
    assert!(before.values().any(|c| !c.is_empty()), "the first key wrote no audit record");

    // Rotate the key: the new one alone cannot continue the chains (the start fails
    // and says how), with the old one as previous key it takes them over.
    let old_key = cfg.audit.signing_key_file.clone().unwrap();
    let new_key = dir.join("audit-2.key");
    let new_public = keygen(&new_key);
    cfg.audit.signing_key_file = Some(new_key);
    let mut p = PipelineProc::start(&dir, "no-previous", &write_config(&dir, "no-previous", &cfg));
    assert!(!p.wait_exit(WAIT).success(), "started with a key that signed none of the chains");
    assert!(p.log_text().contains("previous_signing_key_file"), "{}", p.log_text());
    cfg.audit.previous_signing_key_file = Some(old_key);
    cfg.audit.public_key = Some(first_public.clone());
    let config = write_config(&dir, "second", &cfg);
    let mut p = PipelineProc::start(&dir, "second", &config);
    produce(&cfg, b);
    verdicts.until("verdicts of the second half", |r| r.len() >= valid(a) + valid(b));
    p.stop();

    let after = kafka::read_all(&cfg, &cfg.topics.audit, Duration::from_secs(60)).unwrap();
    let mut handed_over = 0;
    for (part, old) in &before {
        let now = &after[part];
        if old.is_empty() || now.len() == old.len() {
            continue;
        }
        // The first record after the restart hands the chain over, signed by the old key.
        let k = kinds(&now[old.len()..]);
        assert_eq!(k[0], "key_rotation", "partition {part}: {k:?}");
        assert_eq!(k.iter().filter(|x| *x == "key_rotation").count(), 1, "partition {part}: {k:?}");
        handed_over += 1;
    }
    assert!(handed_over > 0, "no chain went on after the rotation");
    // The configured pinned key (the first one) verifies every chain across the hand-over.
    let (ok, out) = audit_verify(&config, &[]);
    assert!(ok && out.contains("key rotation"), "{out}");
    // The new key is not the chains' first key.
    let (ok, out) = audit_verify(&config, &["--public-key", &new_public]);
    assert!(!ok && out.contains("forged"), "{out}");
}

fn dlq_reason(m: &OwnedMessage) -> String {
    use rdkafka::message::Headers;
    let h = m.headers().expect("dead letters carry headers");
    let v = h.iter().find(|x| x.key == twinguard_schemas::fields::DLQ_REASON).expect("a reason").value.unwrap();
    String::from_utf8(v.to_vec()).unwrap()
}

#[test]
fn with_secrets_unsigned_acks_and_feedback_are_dead_lettered() {
    let Setup { dir, broker: _broker, mut cfg } = Setup::new("secrets");
    cfg.response.ack_secret_env = Some("TWINGUARD_IT_ACK_SECRET".into());
    cfg.gating.feedback_secret_env = Some("TWINGUARD_IT_FEEDBACK_SECRET".into());
    cfg.gating.min_labels = 3;
    cfg.gating.window = 20;
    cfg.gating.max_fpr = 0.3;
    cfg.gating.min_precision = 0.0;
    let (ack_secret, fb_secret) = ("ack-secret-of-this-deployment", "feedback-secret-of-this-deployment");
    let config = write_config(&dir, "pipeline", &cfg);
    let mut p = PipelineProc::spawn(
        &dir,
        "pipeline",
        &["run", "--config", config.to_str().unwrap()],
        &[("TWINGUARD_IT_ACK_SECRET", ack_secret), ("TWINGUARD_IT_FEEDBACK_SECRET", fb_secret)],
    );
    p.wait_log(&["starting pipeline"]);
    let prod = producer(&cfg);
    let mac = |key: &str, status: &str| twinguard_operators::audit::ack_mac(key.as_bytes(), "cmd-1", status, "mon-1");
    let acks = [
        json!({"v": 1, "command_id": "cmd-1", "device_id": "mon-1", "status": "applied"}),
        json!({"v": 1, "command_id": "cmd-1", "device_id": "mon-1", "status": "applied", "mac": mac("guessed-secret", "applied")}),
    ];
    for a in &acks {
        send(&prod, &cfg.topics.acks, None, "mon-1", &serde_json::to_vec(a).unwrap());
    }
    // Unsigned labels from anyone: enough to suspend automation if they counted.
    for i in 0..5 {
        let fb = json!({"v": 1, "ref": format!("u-{i}"), "label": "false_positive", "analyst": "mallory"});
        send(&prod, &cfg.topics.feedback, None, "x", &serde_json::to_vec(&fb).unwrap());
    }
    prod.flush(Duration::from_secs(10)).unwrap();
    let mut dlq = Reader::new(&cfg, &cfg.topics.dlq);
    dlq.until("every unsigned control record dead-lettered", |r| r.len() >= acks.len() + 5);
    let reasons: Vec<String> = dlq.records.iter().map(dlq_reason).collect();
    assert_eq!(reasons.iter().filter(|r| r.contains("unsigned ack")).count(), 1, "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| r.contains("ack `mac` does not verify")).count(), 1, "{reasons:?}");
    assert_eq!(reasons.iter().filter(|r| r.contains("unsigned feedback")).count(), 5, "{reasons:?}");
    assert!(!p.log_text().contains("SUSPENDED"), "unsigned feedback counted");
    // Signed feedback counts.
    for (i, who) in ["alice", "bob", "alice"].iter().enumerate() {
        let (r, label) = (format!("s-{i}"), "false_positive");
        let m = twinguard_operators::audit::feedback_mac(fb_secret.as_bytes(), label, who, &r);
        let fb = json!({"v": 1, "ref": r, "label": label, "analyst": who, "mac": m});
        send(&prod, &cfg.topics.feedback, None, "x", &serde_json::to_vec(&fb).unwrap());
    }
    prod.flush(Duration::from_secs(10)).unwrap();
    p.wait_log(&["SUSPENDED"]);
    p.stop();
}
