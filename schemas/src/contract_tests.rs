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

// ---------------------------------------------------------------------------------
// Values.

// ---------------------------------------------------------------------------------
// Rust types against contracts.

mod fixtures;
mod validator;

use fixtures::*;
use validator::*;

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
            AuditKind::ModelPublished,
            AuditKind::ModelActivated,
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
    let dir = crate::testing::manifest_dir().join("contracts");
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
