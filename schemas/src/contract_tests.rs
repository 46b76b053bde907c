//! The response and verdict contracts (`schemas/contracts/*.schema.json`) checked
//! against the Rust types that write and read them.
//!
//! A small JSON Schema subset validator lives here (type, required, properties,
//! additionalProperties, items, enum, const, `$ref` to `#/$defs/X`, minimum), plus a
//! drift check: every property a Rust value serializes must be declared in the
//! contract, every declared property must be serialized by a fully populated value,
//! and `required` must list exactly what a minimal value always serializes.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{json, Map, Value};

use crate::respond::*;
use crate::verdict::{ModelScores, SourceCoords, Verdict, DETECTOR_ENSEMBLE, DETECTOR_TWIN, VERDICT_VERSION};

const VERDICT: &str = include_str!("../contracts/verdict.v1.schema.json");
const ALERT: &str = include_str!("../contracts/alert.v1.schema.json");
const COMMAND: &str = include_str!("../contracts/command.v1.schema.json");
const FEEDBACK: &str = include_str!("../contracts/feedback.v1.schema.json");
const ACK: &str = include_str!("../contracts/ack.v1.schema.json");
const AUDIT: &str = include_str!("../contracts/audit.v1.schema.json");
const REGISTRY: &str = include_str!("../contracts/registry-entry.v1.schema.json");

/// Every contract file with its name (a new file in `contracts/` must be listed).
const CONTRACTS: [(&str, &str); 7] = [
    ("verdict.v1.schema.json", VERDICT),
    ("alert.v1.schema.json", ALERT),
    ("command.v1.schema.json", COMMAND),
    ("feedback.v1.schema.json", FEEDBACK),
    ("ack.v1.schema.json", ACK),
    ("audit.v1.schema.json", AUDIT),
    ("registry-entry.v1.schema.json", REGISTRY),
];

// ---------------------------------------------------------------------------------
// The validator.

fn parse(text: &str) -> Value {
    serde_json::from_str(text).expect("contract file is valid JSON")
}

/// The target of a `$ref` of the form `#/$defs/Name`.
fn resolve<'a>(root: &'a Value, reference: &str) -> Option<&'a Value> {
    let name = reference.strip_prefix("#/$defs/")?;
    root.get("$defs")?.get(name)
}

/// Follow `$ref`s until a schema without one (at most a few hops).
fn deref<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let mut s = schema;
    for _ in 0..16 {
        match s.get("$ref").and_then(Value::as_str).and_then(|r| resolve(root, r)) {
            Some(target) => s = target,
            None => break,
        }
    }
    s
}

fn is_integer(v: &Value) -> bool {
    v.is_i64() || v.is_u64() || v.as_f64().is_some_and(|f| f.is_finite() && f.fract() == 0.0)
}

fn type_matches(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "number" => v.is_number(),
        "integer" => v.is_number() && is_integer(v),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => false,
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) if is_integer(v) => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// JSON equality with numbers compared by value (1 == 1.0).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x == y || x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

/// Validate `v` against `schema` (a node of `root`); errors name the JSON path.
fn validate(schema: &Value, root: &Value, v: &Value, path: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if let Some(allowed) = schema.as_bool() {
        if !allowed {
            errs.push(format!("{path}: no value is allowed here"));
        }
        return errs;
    }
    let Some(s) = schema.as_object() else {
        errs.push(format!("{path}: schema node is not an object: {schema}"));
        return errs;
    };

    if let Some(r) = s.get("$ref") {
        match r.as_str().and_then(|r| resolve(root, r)) {
            Some(target) => errs.extend(validate(target, root, v, path)),
            None => errs.push(format!("{path}: unresolvable $ref {r}")),
        }
    }

    if let Some(t) = s.get("type") {
        let types: Vec<&str> = match t {
            Value::String(one) => vec![one.as_str()],
            Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        if types.is_empty() {
            errs.push(format!("{path}: bad \"type\" in schema: {t}"));
        } else if !types.iter().any(|t| type_matches(t, v)) {
            errs.push(format!("{path}: expected type {t}, found {} {v}", kind_of(v)));
        }
    }

    if let Some(c) = s.get("const") {
        if !json_eq(c, v) {
            errs.push(format!("{path}: expected constant {c}, found {v}"));
        }
    }

    if let Some(e) = s.get("enum") {
        match e.as_array() {
            Some(options) => {
                if !options.iter().any(|o| json_eq(o, v)) {
                    errs.push(format!("{path}: {v} is not one of {e}"));
                }
            }
            None => errs.push(format!("{path}: bad \"enum\" in schema: {e}")),
        }
    }

    if let Some(min) = s.get("minimum") {
        match (min.as_f64(), v.as_f64()) {
            (Some(min), Some(x)) if x < min => errs.push(format!("{path}: {v} is below the minimum {min}")),
            (None, _) => errs.push(format!("{path}: bad \"minimum\" in schema: {min}")),
            _ => {}
        }
    }

    if let Some(obj) = v.as_object() {
        if let Some(required) = s.get("required").and_then(Value::as_array) {
            for name in required.iter().filter_map(Value::as_str) {
                if !obj.contains_key(name) {
                    errs.push(format!("{path}: missing required property \"{name}\""));
                }
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        if let Some(props) = props {
            for (k, sub) in props {
                if let Some(val) = obj.get(k) {
                    errs.extend(validate(sub, root, val, &format!("{path}.{k}")));
                }
            }
        }
        if let Some(additional) = s.get("additionalProperties") {
            for (k, val) in obj {
                if props.is_some_and(|p| p.contains_key(k)) {
                    continue;
                }
                let p = format!("{path}.{k}");
                if additional.as_bool() == Some(false) {
                    errs.push(format!("{p}: property not allowed (additionalProperties: false)"));
                } else {
                    errs.extend(validate(additional, root, val, &p));
                }
            }
        }
    }

    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            errs.extend(validate(items, root, item, &format!("{path}[{i}]")));
        }
    }

    errs
}

/// Properties `v` serializes that the contract does not declare, recursively through
/// nested objects whose schema has "properties" (whatever additionalProperties says).
/// This is the drift check: a field added to a Rust type must be added to the contract.
fn undeclared(schema: &Value, root: &Value, v: &Value, path: &str) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    if let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), v.as_object()) {
        for (k, val) in obj {
            let p = format!("{path}.{k}");
            match props.get(k) {
                Some(sub) => errs.extend(undeclared(sub, root, val, &p)),
                None => errs.push(format!("{p}: serialized by the Rust type but not declared in the contract")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), v.as_array()) {
        for (i, item) in arr.iter().enumerate() {
            errs.extend(undeclared(items, root, item, &format!("{path}[{i}]")));
        }
    }
    errs
}

/// The union of the keys of an array's objects (first value of each key wins).
fn merge_items(arr: &[Value]) -> Value {
    let mut merged = Map::new();
    for item in arr {
        if let Some(obj) = item.as_object() {
            for (k, val) in obj {
                merged.entry(k.clone()).or_insert_with(|| val.clone());
            }
        }
    }
    Value::Object(merged)
}

/// Properties the contract declares that a fully populated value does not serialize
/// (a field removed or renamed in Rust, or a typo in the contract). Array items are
/// checked against the union of the elements' keys.
fn not_serialized(schema: &Value, root: &Value, full: &Value, path: &str) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    if let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), full.as_object()) {
        for (k, sub) in props {
            let p = format!("{path}.{k}");
            match obj.get(k) {
                Some(val) => errs.extend(not_serialized(sub, root, val, &p)),
                None => errs.push(format!("{p}: declared in the contract but not serialized by a full value")),
            }
        }
    }
    if let (Some(items), Some(arr)) = (s.get("items"), full.as_array()) {
        if !arr.is_empty() {
            errs.extend(not_serialized(items, root, &merge_items(arr), &format!("{path}[]")));
        }
    }
    errs
}

/// `required` of each object node must list exactly the keys a minimal value
/// serializes, except `defaulted` paths: always serialized, but optional on input.
fn required_mismatch(schema: &Value, root: &Value, minimal: &Value, path: &str, defaulted: &[&str]) -> Vec<String> {
    let s = deref(schema, root);
    let mut errs = Vec::new();
    let (Some(props), Some(obj)) = (s.get("properties").and_then(Value::as_object), minimal.as_object()) else {
        return errs;
    };
    let required: BTreeSet<&str> = s
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let serialized: BTreeSet<&str> =
        obj.keys().map(String::as_str).filter(|k| !defaulted.contains(&format!("{path}.{k}").as_str())).collect();
    if required != serialized {
        errs.push(format!("{path}: \"required\" is {required:?} but a minimal value always serializes {serialized:?}"));
    }
    for (k, val) in obj {
        if let Some(sub) = props.get(k) {
            errs.extend(required_mismatch(sub, root, val, &format!("{path}.{k}"), defaulted));
        }
    }
    errs
}

fn to_json<T: Serialize>(value: &T) -> Value {
    serde_json::to_value(value).expect("contract types serialize")
}

/// Validation and the undeclared-property check of one value.
fn check_value(contract: &str, v: &Value) -> Vec<String> {
    let root = parse(contract);
    let mut errs = validate(&root, &root, v, "$");
    errs.extend(undeclared(&root, &root, v, "$"));
    errs
}

/// A full and a minimal value of a type against its contract: both valid, nothing
/// undeclared, everything declared serialized by the full one, `required` exact.
fn check_contract<T: Serialize>(name: &str, contract: &str, full: &T, minimal: &T, defaulted: &[&str]) {
    let root = parse(contract);
    let (full, minimal) = (to_json(full), to_json(minimal));
    let mut errs = Vec::new();
    for (what, v) in [("full", &full), ("minimal", &minimal)] {
        errs.extend(check_value(contract, v).into_iter().map(|e| format!("{what}: {e}")));
    }
    errs.extend(not_serialized(&root, &root, &full, "$"));
    errs.extend(required_mismatch(&root, &root, &minimal, "$", defaulted));
    assert!(errs.is_empty(), "{name} does not match its Rust type:\n  {}", errs.join("\n  "));
}

// ---------------------------------------------------------------------------------
// Values.

fn source() -> SourceCoords {
    SourceCoords { topic: "telemetry".into(), partition: 3, offset: 42 }
}

fn model_scores() -> ModelScores {
    ModelScores { ensemble: 0.93, rf: 0.9, svm: -0.25, lstm: 0.8, twin: 0.7 }
}

fn verdict_full() -> Verdict {
    Verdict {
        v: VERDICT_VERSION,
        device_id: "pump-0001".into(),
        event_time: "2025-01-01T00:00:00.000Z".into(),
        source: source(),
        detector: DETECTOR_ENSEMBLE.into(),
        score: 0.93,
        distance: 4.25,
        anomalous: true,
        warming_up: false,
        top_metric: Some("SrcBytes".into()),
        top_z: Some(6.5),
        identity_drift: vec!["src_mac".into()],
        label: Some("Spoofing".into()),
        model_version: Some("ensemble-20250101".into()),
        threshold: Some(0.5),
        scores: Some(model_scores()),
        attack_class: Some("spoofing".into()),
    }
}

fn verdict_minimal() -> Verdict {
    Verdict {
        v: VERDICT_VERSION,
        device_id: "pump-0001".into(),
        event_time: "2025-01-01T00:00:00.000Z".into(),
        source: SourceCoords { topic: "telemetry".into(), partition: 0, offset: 0 },
        detector: DETECTOR_TWIN.into(),
        score: 0.0,
        distance: 0.0,
        anomalous: false,
        warming_up: true,
        top_metric: None,
        top_z: None,
        identity_drift: Vec::new(),
        label: None,
        model_version: None,
        threshold: None,
        scores: None,
        attack_class: None,
    }
}

fn alert_full() -> Alert {
    Alert {
        v: RESPONSE_VERSION,
        alert_id: "telemetry:3:42".into(),
        kind: AlertKind::Detection,
        device_id: "pump-0001".into(),
        device_type: Some("infusion_pump".into()),
        criticality: Some(Criticality::LifeCritical),
        event_time: "2025-01-01T00:00:00.000Z".into(),
        source: Some(source()),
        detector: DETECTOR_ENSEMBLE.into(),
        score: 0.93,
        threshold: Some(0.5),
        scores: Some(model_scores()),
        attack_class: Some("spoofing".into()),
        model_version: Some("ensemble-20250101".into()),
        incident_id: "inc-pump-0001-1".into(),
        incident_alerts: 2,
        features: vec![
            FeatureWeight {
                name: "SrcBytes".into(),
                z: 6.5,
                value: Some(9.2),
                baseline_mean: Some(6.1),
                baseline_sd: Some(0.5),
                phi: false,
            },
            FeatureWeight {
                name: "Heart_rate".into(),
                z: -3.5,
                value: None,
                baseline_mean: None,
                baseline_sd: None,
                phi: true,
            },
        ],
        identity_drift: vec!["src_mac".into()],
        response: AlertResponse {
            rule: "isolate-spoofing".into(),
            action: Action::Escalate,
            command_id: Some("cmd-1".into()),
            automated: false,
            suspended: false,
            needs_human: true,
            note: Some("life-critical device: isolate escalated to a human".into()),
        },
        command_id: Some("cmd-0".into()),
    }
}

fn alert_minimal() -> Alert {
    Alert {
        v: RESPONSE_VERSION,
        alert_id: "command:cmd-0".into(),
        kind: AlertKind::CommandUnacknowledged,
        device_id: "pump-0001".into(),
        device_type: None,
        criticality: None,
        event_time: "2025-01-01T00:00:00.000Z".into(),
        source: None,
        detector: "response".into(),
        score: 1.0,
        threshold: None,
        scores: None,
        attack_class: None,
        model_version: None,
        incident_id: String::new(),
        incident_alerts: 0,
        features: Vec::new(),
        identity_drift: Vec::new(),
        response: AlertResponse {
            rule: "notify-all".into(),
            action: Action::Notify,
            command_id: None,
            automated: false,
            suspended: false,
            needs_human: false,
            note: None,
        },
        command_id: None,
    }
}

fn command_full() -> Command {
    let desired: BTreeMap<String, String> =
        Action::Isolate.desired().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    Command {
        v: RESPONSE_VERSION,
        command_id: "cmd-1".into(),
        device_id: "pump-0001".into(),
        action: Action::Isolate,
        desired,
        issued_at: "2025-01-01T00:00:00.000Z".into(),
        expires_at: "2025-01-01T00:05:00.000Z".into(),
        reason: CommandReason {
            rule: "isolate-spoofing".into(),
            alert_id: "telemetry:3:42".into(),
            incident_id: "inc-pump-0001-1".into(),
            attack_class: Some("spoofing".into()),
            score: 0.93,
        },
    }
}

fn command_minimal() -> Command {
    Command {
        v: RESPONSE_VERSION,
        command_id: "cmd-2".into(),
        device_id: "pump-0001".into(),
        action: Action::Reauthenticate,
        desired: BTreeMap::new(),
        issued_at: "2025-01-01T00:00:00.000Z".into(),
        expires_at: "2025-01-01T00:05:00.000Z".into(),
        reason: CommandReason {
            rule: "reauth".into(),
            alert_id: "telemetry:3:43".into(),
            incident_id: "inc-pump-0001-2".into(),
            attack_class: None,
            score: 0.6,
        },
    }
}

fn feedback_full() -> Feedback {
    Feedback {
        v: RESPONSE_VERSION,
        reference: "telemetry:3:42".into(),
        label: FeedbackLabel::FalsePositive,
        analyst: Some("alice".into()),
        note: Some("scheduled maintenance".into()),
        mac: Some("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843".into()),
    }
}

fn feedback_minimal() -> Feedback {
    Feedback {
        v: RESPONSE_VERSION,
        reference: "telemetry:3:42".into(),
        label: FeedbackLabel::TruePositive,
        analyst: None,
        note: None,
        mac: None,
    }
}

fn ack_full() -> Ack {
    Ack {
        v: RESPONSE_VERSION,
        command_id: "cmd-1".into(),
        device_id: "pump-0001".into(),
        status: AckStatus::Applied,
        reported: BTreeMap::from([("network".to_string(), "isolated".to_string())]),
        mac: Some("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843".into()),
    }
}

fn ack_minimal() -> Ack {
    Ack {
        v: RESPONSE_VERSION,
        command_id: "cmd-1".into(),
        device_id: "pump-0001".into(),
        status: AckStatus::Failed,
        reported: BTreeMap::new(),
        mac: None,
    }
}

fn registry_full() -> RegistryEntry {
    RegistryEntry {
        device_id: "pump-0001".into(),
        device_type: "infusion_pump".into(),
        criticality: Criticality::LifeCritical,
        approved_firmware: vec!["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()],
    }
}

fn registry_minimal() -> RegistryEntry {
    RegistryEntry {
        device_id: "cam-0001".into(),
        device_type: "camera".into(),
        criticality: Criticality::Low,
        approved_firmware: Vec::new(),
    }
}

fn audit_full() -> AuditRecord {
    AuditRecord {
        v: RESPONSE_VERSION,
        chain: 3,
        seq: 7,
        prev: "ab".repeat(32),
        kind: AuditKind::Command,
        at: "2025-01-01T00:00:00.000Z".into(),
        device_id: Some("pump-0001".into()),
        body: to_json(&command_full()),
        key_id: "0123456789abcdef".into(),
        hash: "cd".repeat(32),
        sig: "ef".repeat(64),
    }
}

fn audit_minimal() -> AuditRecord {
    AuditRecord {
        v: RESPONSE_VERSION,
        chain: 0,
        seq: 0,
        prev: "0".repeat(64),
        kind: AuditKind::PolicySuspended,
        at: "2025-01-01T00:00:00.000Z".into(),
        device_id: None,
        body: Value::Null,
        key_id: "0123456789abcdef".into(),
        hash: "cd".repeat(32),
        sig: "ef".repeat(64),
    }
}

// ---------------------------------------------------------------------------------
// Rust types against contracts.

#[test]
fn verdict_matches_contract() {
    check_contract("verdict.v1", VERDICT, &verdict_full(), &verdict_minimal(), &[]);
}

#[test]
fn alert_matches_contract() {
    check_contract("alert.v1", ALERT, &alert_full(), &alert_minimal(), &[]);
}

#[test]
fn command_matches_contract() {
    check_contract("command.v1", COMMAND, &command_full(), &command_minimal(), &[]);
}

#[test]
fn feedback_matches_contract() {
    check_contract("feedback.v1", FEEDBACK, &feedback_full(), &feedback_minimal(), &[]);
}

#[test]
fn ack_matches_contract() {
    check_contract("ack.v1", ACK, &ack_full(), &ack_minimal(), &[]);
}

#[test]
fn audit_matches_contract() {
    check_contract("audit.v1", AUDIT, &audit_full(), &audit_minimal(), &[]);
}

#[test]
fn registry_entry_matches_contract() {
    // `approved_firmware` is always written but `#[serde(default)]` on reading: a
    // registry file may leave it out, so the contract does not require it.
    check_contract("registry-entry.v1", REGISTRY, &registry_full(), &registry_minimal(), &["$.approved_firmware"]);
}

#[test]
fn every_action_command_and_ack_validates() {
    for a in Action::ALL {
        let mut alert = alert_full();
        alert.response.action = a;
        assert!(check_value(ALERT, &to_json(&alert)).is_empty(), "alert with action {a:?}");
        if a.is_command() {
            let mut cmd = command_full();
            cmd.action = a;
            cmd.desired = a.desired().into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            assert!(check_value(COMMAND, &to_json(&cmd)).is_empty(), "command with action {a:?}");
        }
    }
    for status in [AckStatus::Applied, AckStatus::Rejected, AckStatus::Failed] {
        let ack = Ack { status, ..ack_full() };
        assert!(check_value(ACK, &to_json(&ack)).is_empty(), "ack with status {status:?}");
    }
}

#[test]
fn contract_values_round_trip_through_the_rust_types() {
    // What the contract accepts the readers accept (the deny_unknown_fields types).
    let fb: Feedback = serde_json::from_value(to_json(&feedback_full())).unwrap();
    assert_eq!(fb, feedback_full());
    let ack: Ack = serde_json::from_value(to_json(&ack_minimal())).unwrap();
    assert_eq!(ack, ack_minimal());
    let reg: RegistryEntry =
        serde_json::from_value(json!({"device_id": "cam-0001", "device_type": "camera", "criticality": "low"}))
            .unwrap();
    assert_eq!(reg, registry_minimal());
    let audit: AuditRecord = serde_json::from_value(to_json(&audit_full())).unwrap();
    assert_eq!(audit, audit_full());
}

#[test]
fn records_written_before_the_mac_fields_still_parse_and_validate() {
    // v1 acks and feedback from before `mac` existed: still valid, still read.
    let old_ack = json!({"v": 1, "command_id": "cmd-1", "device_id": "pump-0001", "status": "applied"});
    assert!(check_value(ACK, &old_ack).is_empty());
    assert_eq!(serde_json::from_value::<Ack>(old_ack).unwrap().mac, None);
    let old_fb = json!({"v": 1, "ref": "telemetry:3:42", "label": "false_positive", "analyst": "alice"});
    assert!(check_value(FEEDBACK, &old_fb).is_empty());
    assert_eq!(serde_json::from_value::<Feedback>(old_fb).unwrap().mac, None);
    // The wire names the MACs are computed over are the serde names.
    for s in [AckStatus::Applied, AckStatus::Rejected, AckStatus::Failed] {
        assert_eq!(to_json(&s), json!(s.as_str()));
    }
    for l in [FeedbackLabel::TruePositive, FeedbackLabel::FalsePositive, FeedbackLabel::FalseNegative, FeedbackLabel::TrueNegative] {
        assert_eq!(to_json(&l), json!(l.as_str()));
    }
}

// ---------------------------------------------------------------------------------
// The validator can fail.

fn has_error(errs: &[String], needle: &str) -> bool {
    errs.iter().any(|e| e.contains(needle))
}

#[test]
fn feedback_with_unknown_label_fails() {
    let mut v = to_json(&feedback_full());
    v["label"] = json!("maybe");
    let errs = check_value(FEEDBACK, &v);
    assert!(has_error(&errs, "$.label"), "{errs:?}");
    assert!(serde_json::from_value::<Feedback>(v).is_err());
}

#[test]
fn alert_without_device_id_fails() {
    let mut v = to_json(&alert_full());
    v.as_object_mut().unwrap().remove("device_id");
    let errs = check_value(ALERT, &v);
    assert!(has_error(&errs, "missing required property \"device_id\""), "{errs:?}");
}

#[test]
fn command_with_unknown_action_fails() {
    let mut v = to_json(&command_full());
    v["action"] = json!("reboot");
    let errs = check_value(COMMAND, &v);
    assert!(has_error(&errs, "$.action"), "{errs:?}");
    // `notify` is an Action but never a command.
    v["action"] = json!("notify");
    assert!(has_error(&check_value(COMMAND, &v), "$.action"));
}

#[test]
fn audit_record_with_extra_field_fails() {
    let mut v = to_json(&audit_full());
    v["extra"] = json!(1);
    let root = parse(AUDIT);
    let errs = validate(&root, &root, &v, "$");
    assert!(has_error(&errs, "$.extra: property not allowed"), "{errs:?}");
    assert!(serde_json::from_value::<AuditRecord>(v).is_err());
}

#[test]
fn undeclared_property_is_reported() {
    // Alerts allow unknown fields (consumers ignore them), so the schema accepts the
    // value; the drift check still names the field the contract does not document.
    let root = parse(ALERT);
    let mut v = to_json(&alert_full());
    v["surprise"] = json!(true);
    v["response"]["also_new"] = json!("x");
    v["features"][1]["new_stat"] = json!(0.5);
    assert_eq!(validate(&root, &root, &v, "$"), Vec::<String>::new());
    let errs = undeclared(&root, &root, &v, "$");
    assert!(has_error(&errs, "$.surprise:"), "{errs:?}");
    assert!(has_error(&errs, "$.response.also_new:"), "{errs:?}");
    assert!(has_error(&errs, "$.features[1].new_stat:"), "{errs:?}");
    assert_eq!(errs.len(), 3, "{errs:?}");
    // A map's keys are data, not properties.
    assert!(check_value(COMMAND, &to_json(&command_full())).is_empty());
}

#[test]
fn declared_but_not_serialized_and_wrong_required_are_reported() {
    let mut root = parse(FEEDBACK);
    root["properties"]["severity"] = json!({"type": "string", "description": "not in Rust"});
    let errs = not_serialized(&root, &root, &to_json(&feedback_full()), "$");
    assert!(has_error(&errs, "$.severity:"), "{errs:?}");
    root["required"] = json!(["v", "ref", "label", "analyst"]);
    let errs = required_mismatch(&root, &root, &to_json(&feedback_minimal()), "$", &[]);
    assert!(has_error(&errs, "\"required\""), "{errs:?}");
}

#[test]
fn validator_basics() {
    let root = json!({
        "type": "object",
        "required": ["n"],
        "properties": {
            "n": {"type": "integer", "minimum": 1},
            "x": {"type": ["number", "null"]},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag"}},
            "v": {"const": 1, "type": "integer"},
            "m": {"type": "object", "additionalProperties": {"type": "string"}}
        },
        "$defs": {"Tag": {"type": "string", "enum": ["a", "b"]}}
    });
    let ok = json!({"n": 2, "x": null, "tags": ["a", "b"], "v": 1, "m": {"k": "v"}});
    assert_eq!(validate(&root, &root, &ok, "$"), Vec::<String>::new());
    assert!(validate(&root, &root, &json!({"n": 2.0, "x": 1.5}), "$").is_empty(), "2.0 is an integer");
    for (bad, needle) in [
        (json!({"n": 1.5}), "$.n: expected type"),
        (json!({"n": 0}), "$.n: 0 is below the minimum"),
        (json!({"n": 1, "x": "s"}), "$.x: expected type"),
        (json!({"n": 1, "tags": ["a", "c"]}), "$.tags[1]:"),
        (json!({"n": 1, "tags": [1]}), "$.tags[0]: expected type"),
        (json!({"n": 1, "v": 2}), "$.v: expected constant"),
        (json!({"n": 1, "m": {"k": 3}}), "$.m.k: expected type"),
        (json!({"x": 1}), "missing required property \"n\""),
        (json!([1]), "$: expected type"),
    ] {
        let errs = validate(&root, &root, &bad, "$");
        assert!(has_error(&errs, needle), "{bad} should fail with {needle}: {errs:?}");
    }
    let broken = json!({"$ref": "#/$defs/Nope"});
    assert!(has_error(&validate(&broken, &broken, &json!(1), "$"), "unresolvable $ref"));
}

// ---------------------------------------------------------------------------------
// Enums: the contracts list exactly the serde names of the Rust enums.

fn serde_names<T: Serialize>(variants: &[T]) -> BTreeSet<String> {
    let names: BTreeSet<String> = variants
        .iter()
        .map(|x| to_json(x).as_str().expect("a unit variant serializes as a string").to_string())
        .collect();
    assert_eq!(names.len(), variants.len(), "duplicate serde names {names:?}");
    names
}

/// The "enum" of the schema node at a JSON pointer (following a `$ref`).
fn schema_enum(contract: &str, pointer: &str) -> BTreeSet<String> {
    let root = parse(contract);
    let node = root.pointer(pointer).unwrap_or_else(|| panic!("no schema node at {pointer}"));
    let values =
        deref(node, &root).get("enum").and_then(Value::as_array).unwrap_or_else(|| panic!("no enum at {pointer}"));
    let set: BTreeSet<String> =
        values.iter().map(|v| v.as_str().expect("enum values are strings").to_string()).collect();
    assert_eq!(set.len(), values.len(), "duplicate enum values at {pointer}");
    set
}

#[test]
fn enums_match_rust() {
    let actions = serde_names(&Action::ALL);
    assert_eq!(schema_enum(ALERT, "/$defs/AlertResponse/properties/action"), actions);
    let commands: Vec<Action> = Action::ALL.into_iter().filter(|a| a.is_command()).collect();
    assert_eq!(schema_enum(COMMAND, "/properties/action"), serde_names(&commands));
    for a in Action::ALL {
        assert_eq!(to_json(&a), json!(a.as_str()));
    }

    let criticality = [Criticality::Low, Criticality::Medium, Criticality::High, Criticality::LifeCritical];
    for c in criticality {
        assert_eq!(to_json(&c), json!(c.as_str()));
    }
    let criticality = serde_names(&criticality);
    assert_eq!(schema_enum(REGISTRY, "/properties/criticality"), criticality);
    assert_eq!(schema_enum(ALERT, "/properties/criticality"), criticality);

    assert_eq!(
        schema_enum(ACK, "/properties/status"),
        serde_names(&[AckStatus::Applied, AckStatus::Rejected, AckStatus::Failed])
    );
    assert_eq!(
        schema_enum(FEEDBACK, "/properties/label"),
        serde_names(&[
            FeedbackLabel::TruePositive,
            FeedbackLabel::FalsePositive,
            FeedbackLabel::FalseNegative,
            FeedbackLabel::TrueNegative,
        ])
    );
    assert_eq!(
        schema_enum(AUDIT, "/properties/kind"),
        serde_names(&[
            AuditKind::Verdict,
            AuditKind::Command,
            AuditKind::CommandAcknowledged,
            AuditKind::CommandRejected,
            AuditKind::CommandExpired,
            AuditKind::PolicySuspended,
            AuditKind::PolicyResumed,
            AuditKind::KeyRotation,
        ])
    );
    assert_eq!(
        schema_enum(ALERT, "/properties/kind"),
        serde_names(&[AlertKind::Detection, AlertKind::CommandUnacknowledged])
    );
    let detectors: BTreeSet<String> =
        [DETECTOR_TWIN, DETECTOR_ENSEMBLE, DETECTOR_FIRMWARE].iter().map(|d| d.to_string()).collect();
    assert_eq!(schema_enum(VERDICT, "/properties/detector"), detectors);
}

// ---------------------------------------------------------------------------------
// The files themselves.

/// Every object schema node (root, `$defs`, properties, items), with its path.
fn schema_nodes<'a>(node: &'a Value, path: String, out: &mut Vec<(String, &'a Value)>) {
    out.push((path.clone(), node));
    if let Some(defs) = node.get("$defs").and_then(Value::as_object) {
        for (k, sub) in defs {
            schema_nodes(sub, format!("{path}/$defs/{k}"), out);
        }
    }
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (k, sub) in props {
            schema_nodes(sub, format!("{path}/properties/{k}"), out);
        }
    }
    if let Some(items) = node.get("items") {
        schema_nodes(items, format!("{path}/items"), out);
    }
}

#[test]
fn contract_files_are_well_formed() {
    let dir = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo")).join("contracts");
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let text = std::fs::read_to_string(&path).unwrap();
        let root: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{name}: not JSON: {e}"));
        let id = root.get("$id").and_then(Value::as_str).unwrap_or_else(|| panic!("{name}: no $id"));
        assert!(id.ends_with(&format!("/{name}")), "{name}: $id {id} does not end with the file name");
        on_disk.insert(name);
    }
    let listed: BTreeSet<String> = CONTRACTS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(on_disk, listed, "every file in contracts/ is checked by a test here");

    for (name, text) in CONTRACTS {
        let root = parse(text);
        assert_eq!(root["$schema"], json!("https://json-schema.org/draft/2020-12/schema"), "{name}");
        assert_eq!(root["$id"], json!(format!("https://twinguard.dev/contracts/{name}")), "{name}");
        assert_eq!(root["type"], json!("object"), "{name}");
        assert!(root["title"].is_string(), "{name}: title");
        assert!(root["description"].as_str().is_some_and(|d| !d.is_empty()), "{name}: description");
        if name != "registry-entry.v1.schema.json" {
            assert_eq!(
                root["properties"]["v"],
                json!({"type": "integer", "const": 1, "description": "Contract version."}),
                "{name}: v"
            );
        }
        let mut nodes = Vec::new();
        schema_nodes(&root, String::from("#"), &mut nodes);
        for (path, node) in nodes {
            if let Some(r) = node.get("$ref").and_then(Value::as_str) {
                assert!(resolve(&root, r).is_some(), "{name} {path}: unresolvable $ref {r}");
            }
            let Some(props) = node.get("properties").and_then(Value::as_object) else { continue };
            assert!(node["description"].is_string(), "{name} {path}: object without description");
            for (k, p) in props {
                assert!(p["description"].is_string(), "{name} {path}/properties/{k}: no description");
            }
            if let Some(required) = node.get("required").and_then(Value::as_array) {
                for r in required {
                    let r = r.as_str().unwrap();
                    assert!(props.contains_key(r), "{name} {path}: required {r} is not a property");
                }
            }
        }
    }
}
