//! Respond operator tests: the policy as a table, incidents, gating, firmware
//! integrity, acknowledgements, expiry, data minimisation and the audit chain.

use serde_json::{json, Map, Value};
use twinguard_schemas::respond::{Ack, AckStatus, Action, AlertKind, Criticality, RegistryEntry, CLASS_FIRMWARE_TAMPER};
use twinguard_schemas::verdict::{verdicts_from_batch, Verdict};

use super::*;
use crate::audit::{ack_mac, parse_key_hex, verify_chain, verifying_key, AuditLog};
use crate::tests::{batch, event, schema, T0};
use crate::{TwinConfig, TwinOperator};

const NOW: i64 = T0 + 5_000_000;

#[test]
fn policy_table() {
    let mut cfg = PolicyConfig::default();
    cfg.rules.insert(
        0,
        Rule {
            name: "ecg-scan".into(),
            classes: vec!["scanning".into()],
            device_types: vec!["ecg".into()],
            criticality: vec![],
            min_score: None,
            action: Action::RateLimit,
        },
    );
    use Criticality::*;
    // (score, class, device type, criticality) -> (rule, action, overridden)
    let table: &[(f64, Option<&str>, Option<&str>, Criticality, &str, Action, bool)] = &[
        (0.60, None, Some("patient_monitor"), Medium, "default", Action::Notify, false),
        (0.93, None, Some("patient_monitor"), Medium, "likely", Action::RateLimit, false),
        (0.99, None, Some("patient_monitor"), Medium, "near-certain", Action::Isolate, false),
        (0.99, None, Some("patient_monitor"), High, "near-certain", Action::Isolate, false),
        // Life-critical: never isolated by the machine, whatever the score.
        (0.99, None, Some("infusion_pump"), LifeCritical, "near-certain", Action::Escalate, true),
        (1.00, None, Some("ventilator"), LifeCritical, "near-certain", Action::Escalate, true),
        // ...but actions not listed as human-only still run.
        (0.93, None, Some("ventilator"), LifeCritical, "likely", Action::RateLimit, false),
        (0.50, Some(CLASS_FIRMWARE_TAMPER), Some("ventilator"), LifeCritical, "firmware-tamper", Action::SafeMode, false),
        (0.70, Some("Spoofing"), Some("patient_monitor"), Medium, "identity-spoofing", Action::Reauthenticate, false),
        (0.70, Some("scanning"), Some("ecg"), Medium, "ecg-scan", Action::RateLimit, false),
        (0.70, Some("scanning"), Some("oximeter"), Medium, "default", Action::Notify, false),
        (0.99, Some("scanning"), None, Low, "near-certain", Action::Isolate, false),
    ];
    for &(score, class, ty, crit, rule, action, overridden) in table {
        let d = cfg.decide(score, class, ty, crit);
        assert_eq!((d.rule.as_str(), d.action, d.note.is_some()), (rule, action, overridden), "case {score} {class:?} {ty:?} {crit:?}");
    }
    // No rule at all: notify.
    let empty = PolicyConfig { rules: vec![], ..Default::default() };
    assert_eq!(empty.decide(0.99, None, None, Medium).action, Action::Notify);
    // A config can make safe mode human-only too.
    let strict = PolicyConfig { human_only: vec![Action::Isolate, Action::SafeMode], ..Default::default() };
    assert_eq!(strict.decide(0.5, Some(CLASS_FIRMWARE_TAMPER), None, LifeCritical).action, Action::Escalate);
}

struct Fixture {
    twin: TwinOperator,
    resp: Responder,
    next: i64,
}

fn with(f: impl Fn(&mut Map<String, Value>), device: &str, i: i64) -> Map<String, Value> {
    let mut e = event(device, i, 1.0);
    f(&mut e);
    e
}

impl Fixture {
    fn new(registry: Vec<RegistryEntry>, audit: bool) -> Self {
        let mut audit_log = audit.then(|| AuditLog::new([3; 32]));
        if let Some(a) = &mut audit_log {
            a.continue_from(0, None).unwrap();
        }
        Fixture {
            twin: TwinOperator::new(&schema(), TwinConfig::default()),
            // No entries: no registry at all (a configured one, even empty, makes
            // every unlisted device human-only).
            resp: Responder::new(
                &schema(),
                PolicyConfig::default(),
                if registry.is_empty() { Registry::default() } else { Registry::new(registry).unwrap() },
                audit_log,
            ),
            next: 0,
        }
    }

    /// Feed events of one device; returns the verdicts and the responses.
    fn feed(&mut self, events: Vec<Map<String, Value>>, automation: bool, edit: impl Fn(&mut Verdict)) -> (Vec<Verdict>, Responses) {
        let evs: Vec<(i32, i64, Map<String, Value>)> = events
            .into_iter()
            .map(|e| {
                self.next += 1;
                (0, self.next, e)
            })
            .collect();
        let b = batch(&evs);
        let vb = self.twin.process_batch(b.clone()).unwrap();
        let mut verdicts: Vec<Verdict> = verdicts_from_batch(&vb, "t");
        verdicts.iter_mut().for_each(&edit);
        let r = self.resp.respond(&mut self.twin, &b, &mut verdicts, automation, NOW);
        (verdicts, r)
    }

    fn warm(&mut self, device: &str, ty: &str) {
        let evs = (0..40).map(|i| with(|m| { m.insert("device_type".into(), json!(ty)); }, device, i)).collect();
        let (_, r) = self.feed(evs, true, |_| {});
        assert!(r.alerts.is_empty(), "warm-up raised alerts: {:?}", r.alerts);
    }
}

fn attack(score: f64) -> impl Fn(&mut Verdict) {
    move |v| {
        v.anomalous = true;
        v.score = score;
    }
}

#[test]
fn an_incident_commands_once_and_gating_holds_commands_back() {
    let mut f = Fixture::new(vec![], false);
    f.warm("mon-1", "patient_monitor");
    let (_, r) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    assert_eq!(r.alerts.len(), 1);
    assert_eq!(r.commands.len(), 1);
    let (cmd, offset) = &r.commands[0];
    assert_eq!(cmd.action, Action::Isolate);
    assert_eq!(cmd.desired.get("network").map(String::as_str), Some("isolated"));
    assert_eq!(*offset, Some(41));
    assert_eq!(r.alerts[0].response.command_id.as_deref(), Some(cmd.command_id.as_str()));
    assert!(r.alerts[0].response.automated);
    // The same incident: a second alert, no second command, the same command id.
    let (_, r2) = f.feed(vec![event("mon-1", 45, 1.0)], true, attack(0.99));
    assert_eq!(r2.alerts.len(), 1);
    assert!(r2.commands.is_empty());
    assert_eq!(r2.alerts[0].incident_id, r.alerts[0].incident_id);
    assert_eq!(r2.alerts[0].incident_alerts, 2);
    assert_eq!(r2.alerts[0].response.command_id, r.alerts[0].response.command_id);
    assert!(!r2.alerts[0].response.automated);
    // Suspended automation: the alert flows, marked for a human; nothing is commanded.
    f.warm("mon-2", "patient_monitor");
    let (_, r3) = f.feed(vec![event("mon-2", 41, 1.0)], false, attack(0.99));
    assert_eq!(r3.alerts.len(), 1);
    assert!(r3.commands.is_empty());
    let resp = &r3.alerts[0].response;
    assert!(resp.suspended && resp.needs_human && !resp.automated);
    assert_eq!(resp.action, Action::Isolate);
    // Once resumed, the next alert of that incident issues the command.
    let (_, r4) = f.feed(vec![event("mon-2", 42, 1.0)], true, attack(0.99));
    assert_eq!(r4.commands.len(), 1);
    // A quiet period closes the incident: a later attack is a new one.
    let late = 41 + PolicyConfig::default().incident_quiet_secs as i64 + 10;
    let (_, r5) = f.feed(vec![event("mon-1", late, 1.0)], true, attack(0.99));
    assert_ne!(r5.alerts[0].incident_id, r.alerts[0].incident_id);
    assert_eq!(r5.commands.len(), 1);
    assert_ne!(r5.commands[0].0.command_id, cmd.command_id);
}

#[test]
fn life_critical_devices_escalate_instead_of_isolation() {
    let mut f = Fixture::new(
        vec![RegistryEntry { device_id: "vent-1".into(), device_type: "ventilator".into(), criticality: Criticality::LifeCritical, approved_firmware: vec![] }],
        false,
    );
    // Life-critical by the registry, and by the reported type alone.
    f.warm("vent-1", "patient_monitor");
    f.warm("pump-1", "infusion_pump");
    for (d, ty) in [("vent-1", "patient_monitor"), ("pump-1", "infusion_pump")] {
        let e = with(|m| { m.insert("device_type".into(), json!(ty)); }, d, 41);
        let (_, r) = f.feed(vec![e], true, attack(0.995));
        assert!(r.commands.is_empty(), "{d}");
        let a = &r.alerts[0];
        assert_eq!(a.criticality, Some(Criticality::LifeCritical), "{d}");
        assert_eq!(a.response.action, Action::Escalate);
        assert!(a.response.needs_human);
        assert!(a.response.note.as_deref().unwrap().contains("isolate"));
    }
    assert_eq!(f.twin.store().get(0, "vent-1").unwrap().response().device_type.as_deref(), Some("ventilator"));
}

#[test]
fn unapproved_firmware_is_a_verdict_of_its_own() {
    let good = "ab".repeat(32);
    let mut f = Fixture::new(
        vec![RegistryEntry {
            device_id: "mon-9".into(),
            device_type: "patient_monitor".into(),
            criticality: Criticality::High,
            approved_firmware: vec![good.to_uppercase()],
        }],
        false,
    );
    let fw = |h: String| move |m: &mut Map<String, Value>| {
        m.insert("firmware_hash".into(), json!(h.clone()));
    };
    let evs = (0..40).map(|i| with(fw(good.clone()), "mon-9", i)).collect();
    let (_, r) = f.feed(evs, true, |_| {});
    assert!(r.alerts.is_empty());
    let (v, r) = f.feed(vec![with(fw("cd".repeat(32)), "mon-9", 41)], true, |_| {});
    assert!(v[0].anomalous, "the models' verdict is overridden");
    assert_eq!(v[0].attack_class.as_deref(), Some(CLASS_FIRMWARE_TAMPER));
    assert_eq!(v[0].detector, DETECTOR_FIRMWARE);
    assert_eq!(r.commands.len(), 1);
    assert_eq!(r.commands[0].0.action, Action::SafeMode);
    assert_eq!(r.alerts[0].response.rule, "firmware-tamper");
    let twin = f.twin.store().get(0, "mon-9").unwrap();
    assert_eq!(twin.response().reported.get("firmware_hash"), Some(&"cd".repeat(32)));
}

#[test]
fn acks_reconcile_and_silence_expires() {
    let mut f = Fixture::new(vec![], true);
    f.warm("mon-1", "patient_monitor");
    f.warm("mon-2", "patient_monitor");
    let (_, first) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    let cmd = first.commands[0].0.clone();
    assert_eq!(f.twin.store().get(0, "mon-1").unwrap().response().delta().len(), 1);
    let mut out = Responses::default();
    let ack = Ack { v: 1, command_id: cmd.command_id.clone(), device_id: "mon-1".into(), status: AckStatus::Applied, reported: Default::default(), mac: None };
    assert_eq!(f.resp.apply_ack(&mut f.twin, 0, &ack, NOW + 100, &mut out), Ok(AckOutcome::Reconciled));
    let st = &f.twin.store().get(0, "mon-1").unwrap().response();
    assert!(st.pending.is_empty());
    assert_eq!(st.desired, st.reported.iter().filter(|(k, _)| *k != "firmware_hash").map(|(k, v)| (k.clone(), v.clone())).collect());
    assert!(st.delta().is_empty());
    // Again: idempotent.
    assert_eq!(f.resp.apply_ack(&mut f.twin, 0, &ack, NOW + 200, &mut out), Ok(AckOutcome::NotPending));
    // An ack for a device this instance does not hold is refused with the reason.
    let stray = Ack { device_id: "elsewhere".into(), ..ack.clone() };
    assert!(f.resp.apply_ack(&mut f.twin, 0, &stray, NOW, &mut out).unwrap_err().contains("partitioned like the telemetry"));
    // mon-2's command is never acknowledged.
    let (_, r) = f.feed(vec![event("mon-2", 41, 1.0)], true, attack(0.99));
    let ttl = PolicyConfig::default().command_ttl_secs as i64 * 1000;
    assert!(f.resp.expire_commands(&mut f.twin, NOW + ttl - 1).is_empty());
    let ex = f.resp.expire_commands(&mut f.twin, NOW + ttl).remove(&0).unwrap();
    assert_eq!(ex.alerts.len(), 1);
    assert_eq!(ex.alerts[0].kind, AlertKind::CommandUnacknowledged);
    assert_eq!(ex.alerts[0].command_id.as_deref(), Some(r.commands[0].0.command_id.as_str()));
    assert_eq!(f.twin.store().get(0, "mon-2").unwrap().response().delta().len(), 1, "desired state not reached stays visible");
    assert!(f.resp.expire_commands(&mut f.twin, NOW + 2 * ttl).is_empty(), "an expiry alerts once");
    // A late ack still reconciles the reported state (the expiry alert stands).
    let late = Ack { v: 1, command_id: r.commands[0].0.command_id.clone(), device_id: "mon-2".into(), status: AckStatus::Applied, reported: Default::default(), mac: None };
    let mut late_out = Responses::default();
    assert_eq!(f.resp.apply_ack(&mut f.twin, 0, &late, NOW + 3 * ttl, &mut late_out), Ok(AckOutcome::Late));
    assert!(f.twin.store().get(0, "mon-2").unwrap().response().delta().is_empty());
    // The twin's response state goes to the changelog and comes back.
    let cl = f.twin.drain_changelog();
    let rec = cl.iter().find(|c| c.key == "mon-2").unwrap();
    let back = Twin::decode("mon-2", rec.value.as_deref().unwrap()).unwrap();
    assert_eq!(back.response(), f.twin.store().get(0, "mon-2").unwrap().response());
    // Every verdict above threshold, command, ack and expiry is in the chain, in
    // order, and the chain verifies.
    let all: Vec<(i64, Vec<u8>)> =
        first.audit.iter().chain(&out.audit).chain(&r.audit).chain(&ex.audit).chain(&late_out.audit).enumerate().map(|(i, (_, b))| (i as i64, b.clone())).collect();
    let kinds: Vec<String> =
        all.iter().map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["verdict", "command", "command_acknowledged", "verdict", "command", "command_expired", "command_acknowledged"]);
    let key = verifying_key(parse_key_hex(&AuditLog::new([3; 32]).public_key_hex()).unwrap()).unwrap();
    assert_eq!(verify_chain(0, &all, &key, false).unwrap().records, 7);
}

#[test]
fn alerts_withhold_vital_signs() {
    let mut f = Fixture::new(vec![], false);
    f.warm("mon-1", "patient_monitor");
    let e = with(|m| { m.insert("spo2".into(), json!(61.0)); }, "mon-1", 41);
    let (_, r) = f.feed(vec![e], true, |_| {});
    let a = r.alerts.first().expect("a spo2 crash is anomalous");
    let spo2 = a.features.iter().find(|w| w.name == "spo2").expect("spo2 weighed most");
    assert!(spo2.phi && spo2.value.is_none() && spo2.baseline_mean.is_none() && spo2.baseline_sd.is_none());
    assert!(spo2.z < -5.0);
    let text = serde_json::to_string(a).unwrap();
    assert!(!text.contains("61"), "the reading leaked into the alert: {text}");
}

/// An ack from JSON (the wire form), so the test reads like what a device sends.
fn ack(v: Value) -> Ack {
    serde_json::from_value(v).expect("an ack")
}

#[test]
fn a_device_missing_from_a_configured_registry_is_never_isolated_automatically() {
    let registered = RegistryEntry { device_id: "mon-1".into(), device_type: "patient_monitor".into(), criticality: Criticality::Medium, approved_firmware: vec![] };
    let mut f = Fixture::new(vec![registered], false);
    let thermometer = |d: &str, i: i64| with(|m| { m.insert("device_type".into(), json!("thermometer")); }, d, i);
    f.warm("mon-1", "patient_monitor");
    // A device the registry does not list claims a harmless type (a pump after its
    // twin was wiped, say): its human-only actions go to a human.
    f.warm("pump-x", "thermometer");
    let (_, r) = f.feed(vec![thermometer("pump-x", 41)], true, attack(0.99));
    assert!(r.commands.is_empty(), "an unregistered device was commanded: {:?}", r.commands);
    let a = &r.alerts[0];
    assert_eq!((a.response.rule.as_str(), a.response.action), ("near-certain", Action::Escalate));
    assert!(a.response.needs_human && !a.response.automated);
    assert!(a.response.note.as_deref().unwrap().contains("registry"), "{:?}", a.response.note);
    // Actions that are not human-only still run on it.
    let mut f2 = Fixture::new(vec![RegistryEntry { device_id: "mon-1".into(), device_type: "patient_monitor".into(), criticality: Criticality::Medium, approved_firmware: vec![] }], false);
    f2.warm("pump-x", "thermometer");
    let (_, r) = f2.feed(vec![thermometer("pump-x", 41)], true, attack(0.93));
    assert_eq!(r.commands.len(), 1);
    assert_eq!(r.commands[0].0.action, Action::RateLimit);
    // A registered device gets the rule's action.
    let (_, r) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    assert_eq!(r.commands.len(), 1);
    assert_eq!(r.commands[0].0.action, Action::Isolate);
    // Without a registry the reported type decides, as before.
    let mut g = Fixture::new(vec![], false);
    g.warm("pump-x", "thermometer");
    let (_, r) = g.feed(vec![thermometer("pump-x", 41)], true, attack(0.99));
    assert_eq!(r.commands.len(), 1);
    assert_eq!(r.commands[0].0.action, Action::Isolate);
}

#[test]
fn an_ack_naming_another_device_is_refused() {
    let mut f = Fixture::new(vec![], false);
    f.warm("mon-1", "patient_monitor");
    f.warm("mon-2", "patient_monitor");
    let (_, r) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    let cmd = r.commands[0].0.clone();
    let mut out = Responses::default();
    // mon-2 (or whoever writes the acks topic in its name) claims mon-1's command.
    let forged = ack(json!({"v": 1, "command_id": cmd.command_id, "device_id": "mon-2", "status": "applied"}));
    let err = f.resp.apply_ack(&mut f.twin, 0, &forged, NOW + 1, &mut out).unwrap_err();
    assert!(err.contains("`mon-1`") && err.contains("`mon-2`"), "{err}");
    assert_eq!(f.twin.store().get(0, "mon-1").unwrap().response().pending.len(), 1, "the command still awaits its device");
    assert!(out.is_empty());
    // Its own device's ack still reconciles it.
    let own = ack(json!({"v": 1, "command_id": cmd.command_id, "device_id": "mon-1", "status": "applied"}));
    assert_eq!(f.resp.apply_ack(&mut f.twin, 0, &own, NOW + 2, &mut out), Ok(AckOutcome::Reconciled));
}

#[test]
fn with_an_ack_secret_only_acks_with_a_valid_mac_apply() {
    let mut f = Fixture::new(vec![], true);
    f.resp = Responder::new(&schema(), PolicyConfig::default(), Registry::default(), {
        let mut a = AuditLog::new([3; 32]);
        a.continue_from(0, None).unwrap();
        Some(a)
    })
    .with_ack_secret(b"deployment-secret".to_vec());
    f.warm("mon-1", "patient_monitor");
    let (_, r) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    let cmd = r.commands[0].0.clone();
    let id = cmd.command_id.as_str();
    let mut out = Responses::default();
    let good = ack_mac(b"deployment-secret", id, "applied", "mon-1");
    for (bad, why) in [
        (json!({"v": 1, "command_id": id, "device_id": "mon-1", "status": "applied"}), "unsigned ack"),
        (json!({"v": 1, "command_id": id, "device_id": "mon-1", "status": "applied", "mac": ack_mac(b"guessed", id, "applied", "mon-1")}), "does not verify"),
        // A valid mac for another status does not carry over.
        (json!({"v": 1, "command_id": id, "device_id": "mon-1", "status": "applied", "mac": ack_mac(b"deployment-secret", id, "failed", "mon-1")}), "does not verify"),
        (json!({"v": 1, "command_id": id, "device_id": "mon-1", "status": "applied", "mac": "zz"}), "does not verify"),
    ] {
        let err = f.resp.apply_ack(&mut f.twin, 0, &ack(bad), NOW + 1, &mut out).unwrap_err();
        assert!(err.contains(why), "{err}");
    }
    assert_eq!(f.twin.store().get(0, "mon-1").unwrap().response().pending.len(), 1, "a forged ack cleared the command");
    assert!(out.is_empty(), "nothing audited for refused acks");
    let signed = ack(json!({"v": 1, "command_id": id, "device_id": "mon-1", "status": "applied", "mac": good}));
    assert_eq!(f.resp.apply_ack(&mut f.twin, 0, &signed, NOW + 2, &mut out), Ok(AckOutcome::Reconciled));
    assert!(f.twin.store().get(0, "mon-1").unwrap().response().pending.is_empty());
}

#[test]
fn a_record_for_a_chain_without_a_head_is_counted_not_dropped_silently() {
    // Audit on, but partition 0's chain was never continued (its tail not read).
    let mut f = Fixture::new(vec![], false);
    f.resp = Responder::new(&schema(), PolicyConfig::default(), Registry::default(), Some(AuditLog::new([3; 32])));
    f.warm("mon-1", "patient_monitor");
    let (_, r) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    assert_eq!(r.alerts.len(), 1);
    assert!(r.audit.is_empty(), "no record may be appended to an unknown head (it would fork the chain)");
    assert_eq!(r.audit_unchained, vec![(0, AuditKind::Verdict), (0, AuditKind::Command)]);
    assert!(!r.is_empty());
    // Once continued, records are written again.
    f.resp.continue_chain(0, None).unwrap();
    let (_, r) = f.feed(vec![event("mon-1", 42, 1.0)], true, attack(0.99));
    assert!(r.audit_unchained.is_empty());
    assert_eq!(r.audit.len(), 1, "the incident's second alert: a verdict record, no second command");
}

#[test]
fn a_responder_hands_a_chain_over_to_a_rotated_key() {
    // The first key writes part of the chain.
    let mut f = Fixture::new(vec![], true);
    f.warm("mon-1", "patient_monitor");
    let (_, first) = f.feed(vec![event("mon-1", 41, 1.0)], true, attack(0.99));
    let tail = first.audit.last().unwrap().1.clone();
    // A restart with a new key fails without the previous one, and hands over with it.
    let mut rotated = Responder::new(&schema(), PolicyConfig::default(), Registry::default(), Some(AuditLog::new([4; 32])));
    assert!(rotated.continue_chain(0, Some(&tail)).unwrap_err().contains("previous_signing_key_file"));
    let mut rotated =
        Responder::new(&schema(), PolicyConfig::default(), Registry::default(), Some(AuditLog::new([4; 32]).with_previous([3; 32]).unwrap()));
    rotated.continue_chain(0, Some(&tail)).unwrap();
    f.resp = rotated;
    let (_, second) = f.feed(vec![event("mon-1", 45, 1.0)], true, attack(0.99));
    let kinds: Vec<String> =
        second.audit.iter().map(|(_, b)| serde_json::from_slice::<Value>(b).unwrap()["kind"].as_str().unwrap().to_string()).collect();
    assert_eq!(kinds, ["key_rotation", "verdict"]);
    let all: Vec<(i64, Vec<u8>)> = first.audit.iter().chain(&second.audit).enumerate().map(|(i, (_, b))| (i as i64, b.clone())).collect();
    let pinned = verifying_key(parse_key_hex(&AuditLog::new([3; 32]).public_key_hex()).unwrap()).unwrap();
    let s = verify_chain(0, &all, &pinned, false).unwrap();
    assert_eq!((s.records, s.rotations), (4, 1));
}
