//! The respond operator: verdicts → firmware integrity check → alerts → policy →
//! commands, with incidents, desired/reported state and the audit trail kept per
//! device twin.
//!
//! Contract:
//! - The policy is data ([`PolicyConfig`]): the first rule matching a verdict's score,
//!   attack class, device type and criticality picks the action.
//! - A life-critical device is never isolated (or given any action listed in
//!   `human_only`) by the machine: the action becomes `escalate`, a human decides.
//!   With a registry configured, a device it does not list is treated the same way
//!   for `human_only` actions (its telemetry could claim any type).
//! - Repeated alerts of one incident (the same device, alerts less than
//!   `incident_quiet_secs` apart in event time) never repeat a command: a command's
//!   id is a hash of device, incident and action, so even a replay re-issues the same id.
//! - While confidence gating suspends automation, alerts still flow, marked
//!   `suspended` and `needs_human`, and no command is issued.
//! - Every verdict above threshold, every command, acknowledgement and expiry is
//!   appended to the audit log (when one is configured). A record for a chain that
//!   was never continued is not written (that would fork the chain): it is counted
//!   in [`Responses::audit_unchained`] for the pipeline to report loudly.
//! - An ack applies only to a command of the device it names, and, with an ack
//!   secret, only with a valid `mac` ([`crate::audit::ack_mac`]).
//!
//! Architecture Invariant: no I/O and no clock reads; processing time comes in as
//! `now_ms` (command issue and expiry times are processing time, as the devices
//! and network controllers that carry them out live in it).

use std::collections::{BTreeMap, HashMap};

use arrow::array::{Array, Int64Array, StringArray, TimestampMillisecondArray};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use twinguard_schemas::decode::fmt_ms;
use twinguard_schemas::respond::{
    event_ref, Ack, AckStatus, Action, Alert, AlertKind, AlertResponse, AuditKind, Command, CommandReason, Criticality,
    FeatureWeight, RegistryEntry, CLASS_FIRMWARE_TAMPER, DETECTOR_FIRMWARE, RESPONSE_VERSION,
};
use twinguard_schemas::verdict::Verdict;
use twinguard_schemas::{EventSchema, Role};

use crate::audit::{ack_mac, hex, mac_matches, AuditLog};
use crate::twin::{Twin, TwinOperator};

pub use crate::response_state::{Incident, PendingCommand, ResponseState};
use crate::response_state::REMEMBER_EXPIRED;
use crate::InvalidSetting;

/// What one call produced, in the order it happened.
#[derive(Debug, Default)]
pub struct Responses {
    pub alerts: Vec<Alert>,
    /// Commands, with the source offset of the event that caused each (the response
    /// time is measured from that event).
    pub commands: Vec<(Command, Option<i64>)>,
    /// Signed audit records (partition, wire bytes).
    pub audit: Vec<(i32, Vec<u8>)>,
    /// Audit records NOT written because their chain was never continued (its
    /// partition's tail not read): the caller must report them loudly.
    pub audit_unchained: Vec<(i32, AuditKind)>,
}

impl Responses {
    pub fn is_empty(&self) -> bool {
        self.alerts.is_empty() && self.commands.is_empty() && self.audit.is_empty() && self.audit_unchained.is_empty()
    }
}

/// Why an acknowledgement could not be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Applied to the twin.
    Reconciled,
    /// Acknowledged after its expiry: reported state updated, the expiry alert stands.
    Late,
    /// Not pending (already acknowledged, or unknown): nothing changed.
    NotPending,
}

/// The respond operator.
pub struct Responder {
    cfg: PolicyConfig,
    registry: Registry,
    audit: Option<AuditLog>,
    /// Metric name → patient vital sign.
    phi: HashMap<String, bool>,
    firmware_col: Option<usize>,
    device_type_col: Option<usize>,
    /// Gate state last written to each partition's audit chain.
    audited_gate: HashMap<i32, bool>,
    /// The per-deployment secret acks are authenticated with.
    ack_secret: Option<Vec<u8>>,
}

fn hash_id(parts: &[&str]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p.as_bytes());
        h.update([0]);
    }
    hex(&h.finalize()[..16])
}

impl Responder {
    pub fn new(schema: &EventSchema, cfg: PolicyConfig, registry: Registry, audit: Option<AuditLog>) -> Self {
        let col = |role: Role, name: Option<&str>| {
            schema.indices_of(role).into_iter().find(|&i| name.is_none_or(|n| schema.fields[i].name == n)).map(|i| 4 + i)
        };
        Responder {
            phi: schema.fields.iter().filter(|f| f.role == Role::Metric).map(|f| (f.name.clone(), f.phi)).collect(),
            firmware_col: col(Role::Firmware, None),
            device_type_col: col(Role::Property, Some("device_type")),
            cfg,
            registry,
            audit,
            audited_gate: HashMap::new(),
            ack_secret: None,
        }
    }

    /// Require every ack to carry a valid `mac` keyed by `secret`.
    pub fn with_ack_secret(mut self, secret: Vec<u8>) -> Self {
        self.ack_secret = Some(secret);
        self
    }

    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }
    pub fn audit_mut(&mut self) -> Option<&mut AuditLog> {
        self.audit.as_mut()
    }
    /// Forget what was written to a revoked partition's chain.
    pub fn drop_partition(&mut self, p: i32) {
        self.audited_gate.remove(&p);
        if let Some(a) = &mut self.audit {
            a.drop_chain(p);
        }
    }

    fn audit(&mut self, out: &mut Responses, chain: i32, kind: AuditKind, at: String, device: Option<&str>, body: serde_json::Value) {
        if let Some(log) = &mut self.audit {
            if log.has_chain(chain) {
                for (_, bytes) in log.append_all(chain, kind, at, device.map(str::to_string), body) {
                    out.audit.push((chain, bytes));
                }
            } else {
                out.audit_unchained.push((chain, kind));
            }
        }
    }

    /// Whether `partition`'s chain has yet to record the gate being `suspended`.
    pub fn gate_change_pending(&self, partition: i32, suspended: bool) -> bool {
        self.audited_gate.get(&partition).copied().unwrap_or(false) != suspended
    }

    /// Record a change of the confidence gate in `partition`'s chain (once per change).
    pub fn note_gate(&mut self, partition: i32, suspended: bool, status: &serde_json::Value, now_ms: i64, out: &mut Responses) {
        let was = self.audited_gate.get(&partition).copied().unwrap_or(false);
        if was != suspended {
            self.audited_gate.insert(partition, suspended);
            let kind = if suspended { AuditKind::PolicySuspended } else { AuditKind::PolicyResumed };
            self.audit(out, partition, kind, fmt_ms(now_ms), None, status.clone());
        }
    }

    /// Type and criticality of a device: the registry first; otherwise what the
    /// device reports, where a missing type keeps the one seen before and the
    /// criticality never goes down (an event cannot talk a ventilator out of being
    /// life-critical).
    fn classify(&self, device: &str, reported_type: Option<&str>, known: &ResponseState) -> (Option<String>, Criticality) {
        // (A device missing from a configured registry is handled by the policy:
        // `decide_as(.., registered = false)`.)
        if let Some(e) = self.registry.get(device) {
            return (Some(e.device_type.clone()), e.criticality);
        }
        let t = reported_type.map(str::to_string).or_else(|| known.device_type.clone());
        let crit = if t.as_ref().is_some_and(|t| self.cfg.life_critical_types.contains(t)) {
            Criticality::LifeCritical
        } else {
            self.cfg.default_criticality
        };
        (t, known.criticality.map_or(crit, |k| k.max(crit)))
    }

    /// Continue `partition`'s audit chain after `tail`, its last record on the topic;
    /// the gate state the chain last recorded is taken from it when it is a policy
    /// record (otherwise the chain is taken to have automation active).
    pub fn continue_chain(&mut self, partition: i32, tail: Option<&[u8]>) -> Result<(), String> {
        let Some(log) = &mut self.audit else { return Ok(()) };
        log.continue_from(partition, tail)?;
        let kind = tail.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok()).and_then(|v| v["kind"].as_str().map(str::to_string));
        self.audited_gate.insert(partition, kind.as_deref() == Some("policy_suspended"));
        Ok(())
    }

    /// Respond to one partition's verdicts (in place: a firmware mismatch turns the
    /// verdict into a `firmware_tamper` verdict). `events` is the decoded batch the
    /// verdicts came from; `automation` is false while confidence gating suspends it.
    pub fn respond(
        &mut self,
        twins: &mut TwinOperator,
        events: &RecordBatch,
        verdicts: &mut [Verdict],
        automation: bool,
        now_ms: i64,
    ) -> Responses {
        let mut out = Responses::default();
        // Per-event firmware and type, by source offset.
        let offsets = events.column(3).as_any().downcast_ref::<Int64Array>().expect("source offset column");
        let times = events.column(1).as_any().downcast_ref::<TimestampMillisecondArray>().expect("event time column");
        let str_col = |c: Option<usize>| c.and_then(|c| events.column(c).as_any().downcast_ref::<StringArray>());
        let (fw, ty) = (str_col(self.firmware_col), str_col(self.device_type_col));
        let mut rows: HashMap<i64, usize> = HashMap::with_capacity(events.num_rows());
        for i in 0..events.num_rows() {
            rows.insert(offsets.value(i), i);
        }
        let get = |a: Option<&StringArray>, row: usize| a.filter(|a| !a.is_null(row)).map(|a| a.value(row).to_string());
        for v in verdicts.iter_mut() {
            let p = v.source.partition;
            let Some(&row) = rows.get(&v.source.offset) else { continue };
            let t = times.value(row);
            let firmware = get(fw, row);
            let reported_type = get(ty, row);
            let Some(known) = twins.store().get(p, &v.device_id) else { continue };
            let (device_type, crit) = self.classify(&v.device_id, reported_type.as_deref(), known.response());
            // Firmware integrity: a hash the registry does not approve is a verdict of its own.
            let tampered = match (self.registry.get(&v.device_id), &firmware) {
                (Some(e), Some(h)) if !e.approved_firmware.is_empty() => !e.approved_firmware.iter().any(|a| a.eq_ignore_ascii_case(h)),
                _ => false,
            };
            {
                let Some(twin) = twins.store_mut().get_mut(p, &v.device_id) else { continue };
                let cur = twin.response();
                let new_fw = firmware.as_ref().filter(|h| cur.reported.get("firmware_hash") != Some(*h));
                if new_fw.is_some() || cur.device_type != device_type || cur.criticality != Some(crit) {
                    let r = twin.response_mut();
                    if let Some(h) = new_fw {
                        r.reported.insert("firmware_hash".into(), h.clone());
                    }
                    r.device_type = device_type.clone();
                    r.criticality = Some(crit);
                    twins.touch(p, &v.device_id);
                }
            }
            if tampered {
                v.anomalous = true;
                v.detector = DETECTOR_FIRMWARE.into();
                v.attack_class = Some(CLASS_FIRMWARE_TAMPER.into());
            }
            if !v.anomalous {
                continue;
            }
            self.alert(twins, v, t, (device_type, crit), automation, now_ms, &mut out);
        }
        out
    }

    /// The alert for one anomalous verdict (audited), its incident opened or
    /// continued on the twin, and the command its rule asks for: issued when
    /// automation is on and the incident has not had it yet, else noted on the alert.
    #[allow(clippy::too_many_arguments)]
    fn alert(&mut self, twins: &mut TwinOperator, v: &Verdict, t: i64, (device_type, crit): (Option<String>, Criticality), automation: bool, now_ms: i64, out: &mut Responses) {
        let p = v.source.partition;
    let at = v.event_time.clone();
    self.audit(out, p, AuditKind::Verdict, at.clone(), Some(&v.device_id), serde_json::to_value(&*v).expect("verdict serialises"));
    let alert_id = event_ref(&v.source);
    let class = v.attack_class.clone();
    let registered = !self.registry.is_configured() || self.registry.get(&v.device_id).is_some();
    let Decision { rule: rule_name, action, note } = self.cfg.decide_as(v.score, class.as_deref(), device_type.as_deref(), crit, registered);
    let quiet = i64::try_from(self.cfg.incident_quiet_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
    let features = {
        let twin = twins.store().get(p, &v.device_id).expect("twin exists");
        self.features(twins, twin)
    };
    let twin = twins.store_mut().get_mut(p, &v.device_id).expect("twin exists");
    let r = twin.response_mut();
    let incident = match &mut r.incident {
        Some(inc) if t.saturating_sub(inc.last_ms) <= quiet && t >= inc.opened_ms.saturating_sub(quiet) => {
            inc.alerts += 1;
            inc.last_ms = inc.last_ms.max(t);
            inc
        }
        slot => slot.insert(Incident { id: format!("{}@{}", v.device_id, alert_id), opened_ms: t, last_ms: t, alerts: 1, actions: vec![] }),
    };
    let incident_id = incident.id.clone();
    let incident_alerts = incident.alerts;
    let mut response =
        AlertResponse { rule: rule_name.clone(), action, command_id: None, automated: false, suspended: false, needs_human: action == Action::Escalate, note };
    let mut command = None;
    if action.is_command() {
        let command_id = hash_id(&[&v.device_id, &incident_id, action.as_str()]);
        if incident.actions.contains(&action) {
            response.command_id = Some(command_id);
            response.note = Some("already commanded in this incident".into());
        } else if !automation {
            response.suspended = true;
            response.needs_human = true;
            response.note = Some("automated actions suspended by confidence gating".into());
        } else {
            incident.actions.push(action);
            let ttl = i64::try_from(self.cfg.command_ttl_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
            let desired: BTreeMap<String, String> = action.desired().map(|(k, x)| (k.to_string(), x.to_string())).into_iter().collect();
            r.desired.extend(desired.clone());
            r.pending.push(PendingCommand {
                command_id: command_id.clone(),
                action,
                issued_ms: now_ms,
                expires_ms: now_ms.saturating_add(ttl),
                desired: desired.clone(),
            });
            response.command_id = Some(command_id.clone());
            response.automated = true;
            command = Some(Command {
                v: RESPONSE_VERSION,
                command_id,
                device_id: v.device_id.clone(),
                action,
                desired,
                issued_at: fmt_ms(now_ms),
                expires_at: fmt_ms(now_ms.saturating_add(ttl)),
                reason: CommandReason {
                    rule: rule_name,
                    alert_id: alert_id.clone(),
                    incident_id: incident_id.clone(),
                    attack_class: class.clone(),
                    score: v.score,
                },
            });
        }
    }
    twins.touch(p, &v.device_id);
    out.alerts.push(Alert {
        v: RESPONSE_VERSION,
        alert_id,
        kind: AlertKind::Detection,
        device_id: v.device_id.clone(),
        device_type: device_type.clone(),
        criticality: Some(crit),
        event_time: at.clone(),
        source: Some(v.source.clone()),
        detector: v.detector.clone(),
        score: v.score,
        threshold: v.threshold,
        scores: v.scores.clone(),
        attack_class: class,
        model_version: v.model_version.clone(),
        incident_id,
        incident_alerts,
        features,
        identity_drift: v.identity_drift.clone(),
        response,
        command_id: None,
    });
    if let Some(c) = command {
        self.audit(out, p, AuditKind::Command, at, Some(&v.device_id), serde_json::to_value(&c).expect("command serialises"));
        out.commands.push((c, Some(v.source.offset)));
    }
    }

    fn features(&self, twins: &TwinOperator, twin: &Twin) -> Vec<FeatureWeight> {
        twins
            .explain(twin, self.cfg.top_features)
            .into_iter()
            .map(|(name, z, value, mean, sd)| {
                let phi = self.phi.get(&name).copied().unwrap_or(false);
                let r = |x: f64| (x * 1e4).round() / 1e4;
                FeatureWeight {
                    z: r(z),
                    value: (!phi).then_some(r(value)),
                    baseline_mean: (!phi).then_some(r(mean)),
                    baseline_sd: (!phi).then_some(r(sd)),
                    phi,
                    name,
                }
            })
            .collect()
    }

    /// Apply a device's acknowledgement to its twin in `partition` (or any owned
    /// partition). `Err` names why it cannot be applied: a missing or wrong `mac`
    /// (with an ack secret), a device this instance does not hold, or a command
    /// issued to another device.
    pub fn apply_ack(&mut self, twins: &mut TwinOperator, partition: i32, ack: &Ack, now_ms: i64, out: &mut Responses) -> Result<AckOutcome, String> {
        if let Some(secret) = &self.ack_secret {
            let Some(mac) = &ack.mac else {
                return Err("unsigned ack: acks must carry `mac` (an ack secret is configured, `response.ack_secret_env`)".into());
            };
            let expected = ack_mac(secret, &ack.command_id, ack.status.as_str(), &ack.device_id);
            if !mac_matches(&expected, mac, !ack.command_id.contains('\n')) {
                return Err(format!("ack `mac` does not verify for command `{}` of device `{}` (HMAC-SHA256 with the deployment's ack secret)", ack.command_id, ack.device_id));
            }
        }
        let p = if twins.store().get(partition, &ack.device_id).is_some() {
            partition
        } else {
            twins
                .store()
                .partitions()
                .into_iter()
                .find(|q| twins.store().get(*q, &ack.device_id).is_some())
                .ok_or_else(|| format!("device `{}` has no twin on this instance: acks must be keyed by device id and partitioned like the telemetry", ack.device_id))?
        };
        let twin = twins.store_mut().get_mut(p, &ack.device_id).expect("found above");
        let r = twin.response_mut();
        let (cmd, late) = if let Some(i) = r.pending.iter().position(|c| c.command_id == ack.command_id) {
            (r.pending.remove(i), false)
        } else if let Some(i) = r.expired.iter().position(|c| c.command_id == ack.command_id) {
            (r.expired.remove(i), true)
        } else {
            // The command may be another device's: an ack in the wrong name is refused.
            let owner = twins.store().iter().find(|t| {
                t.device_id != ack.device_id && t.response().pending.iter().chain(&t.response().expired).any(|c| c.command_id == ack.command_id)
            });
            if let Some(t) = owner {
                return Err(format!("ack names device `{}` but command `{}` was issued to device `{}`", ack.device_id, ack.command_id, t.device_id));
            }
            return Ok(AckOutcome::NotPending);
        };
        let reported = if ack.reported.is_empty() && ack.status == AckStatus::Applied { cmd.desired.clone() } else { ack.reported.clone() };
        r.reported.extend(reported);
        twins.touch(p, &ack.device_id);
        let body = json!({"command_id": ack.command_id, "action": cmd.action, "status": ack.status, "reported": ack.reported, "late": late});
        if ack.status == AckStatus::Applied {
            self.audit(out, p, AuditKind::CommandAcknowledged, fmt_ms(now_ms), Some(&ack.device_id), body);
            if late {
                return Ok(AckOutcome::Late);
            }
        } else {
            self.audit(out, p, AuditKind::CommandRejected, fmt_ms(now_ms), Some(&ack.device_id), body);
            let twin = twins.store().get(p, &ack.device_id).expect("found above");
            let status = serde_json::to_value(ack.status).ok().and_then(|s| s.as_str().map(str::to_string)).unwrap_or_default();
            out.alerts.push(self.command_alert(twin, &cmd, now_ms, format!("the device answered `{status}`")));
        }
        Ok(AckOutcome::Reconciled)
    }

    /// Raise an alert (and an audit record) for every pending command past its
    /// expiry; the desired state stays, so the delta shows what was never reached.
    /// Returns the responses per partition.
    pub fn expire_commands(&mut self, twins: &mut TwinOperator, now_ms: i64) -> BTreeMap<i32, Responses> {
        let mut by_partition: BTreeMap<i32, Responses> = BTreeMap::new();
        let mut due: Vec<(i32, String)> = Vec::new();
        for t in twins.store().iter() {
            if t.response().pending.iter().any(|c| c.expires_ms <= now_ms) {
                due.push((t.partition, t.device_id.to_string()));
            }
        }
        due.sort();
        for (p, device) in due {
            let twin = twins.store_mut().get_mut(p, &device).expect("listed above");
            let (expired, keep): (Vec<PendingCommand>, Vec<PendingCommand>) =
                std::mem::take(&mut twin.response_mut().pending).into_iter().partition(|c| c.expires_ms <= now_ms);
            let r = twin.response_mut();
            r.pending = keep;
            r.expired.extend(expired.iter().cloned());
            let over = r.expired.len().saturating_sub(REMEMBER_EXPIRED);
            r.expired.drain(..over);
            twins.touch(p, &device);
            let out = by_partition.entry(p).or_default();
            for cmd in expired {
                let body = json!({"command_id": cmd.command_id, "action": cmd.action, "expired_at": fmt_ms(cmd.expires_ms)});
                self.audit(out, p, AuditKind::CommandExpired, fmt_ms(now_ms), Some(&device), body);
                let twin = twins.store().get(p, &device).expect("listed above");
                out.alerts.push(self.command_alert(twin, &cmd, now_ms, "not acknowledged before its expiry".into()));
            }
        }
        by_partition
    }

    fn command_alert(&self, twin: &Twin, cmd: &PendingCommand, now_ms: i64, why: String) -> Alert {
        let r = twin.response();
        Alert {
            v: RESPONSE_VERSION,
            alert_id: format!("command:{}", cmd.command_id),
            kind: AlertKind::CommandUnacknowledged,
            device_id: twin.device_id.to_string(),
            device_type: r.device_type.clone(),
            criticality: r.criticality,
            event_time: fmt_ms(now_ms),
            source: None,
            detector: "response".into(),
            score: 1.0,
            threshold: None,
            scores: None,
            attack_class: None,
            model_version: None,
            incident_id: r.incident.as_ref().map(|i| i.id.clone()).unwrap_or_default(),
            incident_alerts: r.incident.as_ref().map_or(0, |i| i.alerts),
            features: vec![],
            identity_drift: vec![],
            response: AlertResponse {
                rule: "command-expiry".into(),
                action: Action::Escalate,
                command_id: Some(cmd.command_id.clone()),
                automated: false,
                suspended: false,
                needs_human: true,
                note: Some(format!("`{}` {why}; desired state not reached: {:?}", cmd.action.as_str(), r.delta())),
            },
            command_id: Some(cmd.command_id.clone()),
        }
    }
}

mod policy;

pub use policy::*;

#[cfg(test)]
mod tests;
