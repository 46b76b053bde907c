//! The response contracts: alerts, commands, analyst feedback, device command
//! acknowledgements, the device registry and audit records. Every one of them is a
//! public topic or file format, documented as a JSON Schema in `schemas/contracts/`
//! (a test checks these types against those files).
//!
//! Versioning: each record carries `"v"`. Within a version fields are only ever
//! added (optional ones); a consumer MUST ignore fields it does not know. Removing
//! or retyping a field is a new version on a new topic.
//!
//! Data minimisation (HIPAA/GDPR): an alert names the device and the metrics that
//! weighed most with their deviation from the device's own baseline. For metrics
//! marked `phi = true` in the event schema (patient vital signs) it carries the
//! z-score only, never the reading or the patient's baseline. Commands carry no
//! telemetry at all.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::verdict::{ModelScores, SourceCoords};

/// Contract version of alerts, commands, feedback, acks and audit records.
pub const RESPONSE_VERSION: u32 = 1;

/// Attack class of a verdict whose device reported a firmware hash its registry
/// entry does not approve.
pub const CLASS_FIRMWARE_TAMPER: &str = "firmware_tamper";
/// Detector name of a verdict decided by the firmware integrity check.
pub const DETECTOR_FIRMWARE: &str = "firmware_integrity";

/// What a response rule asks for. `Notify` and `Escalate` produce no device
/// command (the alert is the action); the others are commands to the device's
/// network or management plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Alert only.
    Notify,
    /// Hand the decision to a human (never automated).
    Escalate,
    /// Throttle the device's traffic.
    RateLimit,
    /// Force the device to re-authenticate (rotate its session credentials).
    Reauthenticate,
    /// Switch the device to its safe mode (local operation only).
    SafeMode,
    /// Cut the device off the network.
    Isolate,
}

impl Action {
    pub const ALL: [Action; 6] =
        [Action::Notify, Action::Escalate, Action::RateLimit, Action::Reauthenticate, Action::SafeMode, Action::Isolate];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Notify => "notify",
            Action::Escalate => "escalate",
            Action::RateLimit => "rate_limit",
            Action::Reauthenticate => "reauthenticate",
            Action::SafeMode => "safe_mode",
            Action::Isolate => "isolate",
        }
    }

    /// Whether the action is carried out by a command on the commands topic.
    pub fn is_command(self) -> bool {
        !matches!(self, Action::Notify | Action::Escalate)
    }

    /// The desired-state entry the command asks the device to reach, if any.
    pub fn desired(self) -> Option<(&'static str, &'static str)> {
        match self {
            Action::Notify | Action::Escalate => None,
            Action::RateLimit => Some(("network", "rate_limited")),
            Action::Isolate => Some(("network", "isolated")),
            Action::SafeMode => Some(("mode", "safe")),
            Action::Reauthenticate => Some(("auth", "reauthenticated")),
        }
    }
}

/// How much harm an automated action on the device could do to a patient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criticality {
    Low,
    Medium,
    High,
    /// Keeps a patient alive (ventilators, infusion pumps): never isolated by a machine.
    LifeCritical,
}

impl Criticality {
    pub fn as_str(self) -> &'static str {
        match self {
            Criticality::Low => "low",
            Criticality::Medium => "medium",
            Criticality::High => "high",
            Criticality::LifeCritical => "life_critical",
        }
    }
}

/// One metric that weighed in a verdict, against the device's own baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureWeight {
    pub name: String,
    /// Deviation from the device's baseline in baseline standard deviations
    /// (after the metric's transform, e.g. log1p).
    pub z: f64,
    /// The (transformed) value; absent for patient vital signs.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub value: Option<f64>,
    /// The device's baseline mean and spread for the metric; absent for vitals.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub baseline_mean: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub baseline_sd: Option<f64>,
    /// The metric is a patient vital sign: value and baseline withheld.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub phi: bool,
}

/// What the pipeline did about an alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertResponse {
    /// Name of the policy rule that matched.
    pub rule: String,
    /// The action the rule chose (after the life-critical override).
    pub action: Action,
    /// The command carrying it out, when one was issued by this alert.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command_id: Option<String>,
    /// A command was issued automatically for this alert.
    pub automated: bool,
    /// Automation is suspended by confidence gating: nothing was issued.
    pub suspended: bool,
    /// A human must decide (escalation, suspension, or a life-critical device).
    pub needs_human: bool,
    /// Why (e.g. "life-critical device: isolate escalated to a human").
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
}

/// Kinds of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A verdict above threshold (models, twin or firmware check).
    Detection,
    /// A command was not acknowledged by the device before its expiry, or the
    /// device rejected it.
    CommandUnacknowledged,
}

/// An alert on the alerts topic (keyed by device id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub v: u32,
    /// `topic:partition:offset` of the event that raised it (a command expiry:
    /// `command:<command id>`). Feedback refers to alerts by this id.
    pub alert_id: String,
    pub kind: AlertKind,
    pub device_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub criticality: Option<Criticality>,
    /// Event time of the triggering event (RFC 3339, UTC).
    pub event_time: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub source: Option<SourceCoords>,
    pub detector: String,
    pub score: f64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scores: Option<ModelScores>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attack_class: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model_version: Option<String>,
    /// The incident this alert belongs to; repeated alerts share it.
    pub incident_id: String,
    /// Alerts so far in the incident (1 for the first).
    pub incident_alerts: u32,
    /// The metrics that weighed most, largest deviation first.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub features: Vec<FeatureWeight>,
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub identity_drift: Vec<String>,
    pub response: AlertResponse,
    /// For `command_unacknowledged`: the command that timed out.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub command_id: Option<String>,
}

/// Why a command was issued.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandReason {
    pub rule: String,
    pub alert_id: String,
    pub incident_id: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attack_class: Option<String>,
    pub score: f64,
}

/// A response command on the commands topic (keyed by device id). Consumers (NAC,
/// device management) MUST treat `command_id` as an idempotency key and MUST NOT
/// carry out a command after `expires_at`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    pub v: u32,
    /// Idempotency key: the same incident and action always give the same id.
    pub command_id: String,
    pub device_id: String,
    pub action: Action,
    /// Desired-state entries the device should reach (e.g. `network = isolated`).
    pub desired: BTreeMap<String, String>,
    /// When the command was issued (processing time, RFC 3339, UTC).
    pub issued_at: String,
    pub expires_at: String,
    pub reason: CommandReason,
}

/// Analyst verdict on an alert or a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FeedbackLabel {
    /// The alert was a real attack.
    TruePositive,
    /// The alert was not an attack.
    FalsePositive,
    /// A verdict that did not alert was an attack (a miss).
    FalseNegative,
    /// A verdict that did not alert was confirmed benign.
    TrueNegative,
}

impl FeedbackLabel {
    /// The wire name (`true_positive`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            FeedbackLabel::TruePositive => "true_positive",
            FeedbackLabel::FalsePositive => "false_positive",
            FeedbackLabel::FalseNegative => "false_negative",
            FeedbackLabel::TrueNegative => "true_negative",
        }
    }
}

/// A record on the analyst feedback topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    pub v: u32,
    /// The alert id (for true/false positives) or the verdict's `topic:partition:offset`
    /// (for false/true negatives).
    #[serde(rename = "ref")]
    pub reference: String,
    pub label: FeedbackLabel,
    /// Who labelled it. Recorded with the label (the gate counts labels per analyst).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub analyst: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub note: Option<String>,
    /// HMAC-SHA256 (lower-case hex) keyed by the deployment's feedback secret over
    /// `twinguard-feedback-v1\n<label>\n<analyst or empty>\n<ref>`. Required when the
    /// pipeline has a feedback secret (`[gating] feedback_secret_env`); an analyst
    /// name holding a line break never verifies.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac: Option<String>,
}

/// Outcome a device reports for a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AckStatus {
    Applied,
    Rejected,
    Failed,
}

impl AckStatus {
    /// The wire name (`applied`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            AckStatus::Applied => "applied",
            AckStatus::Rejected => "rejected",
            AckStatus::Failed => "failed",
        }
    }
}

/// A device's acknowledgement of a command, on the acks topic. MUST be keyed by
/// device id and partitioned like the telemetry topic (same key, same partitioner),
/// so the instance that owns the device's twin reads it. `device_id` MUST be the
/// device the command was issued to (otherwise the ack is dead-lettered).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    pub v: u32,
    pub command_id: String,
    pub device_id: String,
    pub status: AckStatus,
    /// State the device now reports (e.g. `network = isolated`); when absent and
    /// `status = applied`, the command's desired entries are taken as reported.
    #[serde(skip_serializing_if = "BTreeMap::is_empty", default)]
    pub reported: BTreeMap<String, String>,
    /// HMAC-SHA256 (lower-case hex) keyed by the deployment's ack secret over
    /// `twinguard-ack-v1\n<command_id>\n<status>\n<device_id>`. Required when the
    /// pipeline has an ack secret (`[response] ack_secret_env`).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mac: Option<String>,
}

/// One device of the registry file: type, criticality, approved firmware.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryEntry {
    pub device_id: String,
    pub device_type: String,
    pub criticality: Criticality,
    /// Firmware hashes approved for this device (lower-case hex). Empty: the
    /// device's firmware is not checked.
    #[serde(default)]
    pub approved_firmware: Vec<String>,
}

/// Kinds of audit record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditKind {
    /// A verdict above threshold.
    Verdict,
    /// A command issued.
    Command,
    /// A command acknowledged by its device.
    CommandAcknowledged,
    /// A command the device answered `rejected` or `failed`.
    CommandRejected,
    /// A command that expired unacknowledged.
    CommandExpired,
    /// Confidence gating suspended automated actions.
    PolicySuspended,
    /// Confidence gating resumed automated actions.
    PolicyResumed,
    /// The signing key changed: signed by the OLD key, `body.public_key` names the
    /// new one (hex), which signs every later record of the chain.
    KeyRotation,
    /// A federation's aggregator published a model version (its own chain, on the
    /// federation's audit topic): `body` names the version, its artifact's SHA-256,
    /// the parent version, the run and the plan hash.
    ModelPublished,
    /// A pipeline partition switched to a model version from `body.first_offset` on:
    /// `body` names the version, its artifact's SHA-256 and the version it replaced.
    ModelActivated,
}

/// A record of the audit topic. `hash` is the SHA-256 (hex) of the record's
/// canonical JSON without `hash` and `sig` (keys sorted, no whitespace); `sig` the
/// ed25519 signature (hex) of that hash's 32 bytes; `prev` the previous record's
/// `hash` in the same chain (64 zeros for the first). One chain per partition of
/// the audit topic, which is partitioned like the telemetry topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditRecord {
    pub v: u32,
    /// The chain: the audit topic partition it was written to.
    pub chain: i32,
    /// Position in the chain, from 0, without gaps.
    pub seq: u64,
    pub prev: String,
    pub kind: AuditKind,
    /// Event time the record is about (RFC 3339, UTC); processing time for expiries
    /// and policy changes.
    pub at: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device_id: Option<String>,
    /// What happened: the verdict, the command, the gate's figures.
    pub body: serde_json::Value,
    /// First 8 bytes (hex) of the signing public key.
    pub key_id: String,
    pub hash: String,
    pub sig: String,
}

/// `topic:partition:offset`, the id of an event's verdict and of the alert it raises.
pub fn event_ref(source: &SourceCoords) -> String {
    format!("{}:{}:{}", source.topic, source.partition, source.offset)
}
