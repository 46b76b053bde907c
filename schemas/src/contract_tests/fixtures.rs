//! Each contract's record twice: with every field set (`*_full`) and with only
//! what is required (`*_minimal`).

use super::*;

pub(super) fn source() -> SourceCoords {
    SourceCoords { topic: "telemetry".into(), partition: 3, offset: 42 }
}

pub(super) fn model_scores() -> ModelScores {
    ModelScores { ensemble: 0.93, rf: 0.9, svm: -0.25, lstm: 0.8, twin: 0.7, gbdt: Some(0.95) }
}

pub(super) fn verdict_full() -> Verdict {
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

pub(super) fn verdict_minimal() -> Verdict {
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

pub(super) fn alert_full() -> Alert {
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

pub(super) fn alert_minimal() -> Alert {
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

pub(super) fn command_full() -> Command {
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

pub(super) fn command_minimal() -> Command {
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

pub(super) fn feedback_full() -> Feedback {
    Feedback {
        v: RESPONSE_VERSION,
        reference: "telemetry:3:42".into(),
        label: FeedbackLabel::FalsePositive,
        analyst: Some("alice".into()),
        note: Some("scheduled maintenance".into()),
        mac: Some("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843".into()),
    }
}

pub(super) fn feedback_minimal() -> Feedback {
    Feedback {
        v: RESPONSE_VERSION,
        reference: "telemetry:3:42".into(),
        label: FeedbackLabel::TruePositive,
        analyst: None,
        note: None,
        mac: None,
    }
}

pub(super) fn ack_full() -> Ack {
    Ack {
        v: RESPONSE_VERSION,
        command_id: "cmd-1".into(),
        device_id: "pump-0001".into(),
        status: AckStatus::Applied,
        reported: BTreeMap::from([("network".to_string(), "isolated".to_string())]),
        mac: Some("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843".into()),
    }
}

pub(super) fn ack_minimal() -> Ack {
    Ack {
        v: RESPONSE_VERSION,
        command_id: "cmd-1".into(),
        device_id: "pump-0001".into(),
        status: AckStatus::Failed,
        reported: BTreeMap::new(),
        mac: None,
    }
}

pub(super) fn registry_full() -> RegistryEntry {
    RegistryEntry {
        device_id: "pump-0001".into(),
        device_type: "infusion_pump".into(),
        criticality: Criticality::LifeCritical,
        approved_firmware: vec!["9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into()],
    }
}

pub(super) fn registry_minimal() -> RegistryEntry {
    RegistryEntry {
        device_id: "cam-0001".into(),
        device_type: "camera".into(),
        criticality: Criticality::Low,
        approved_firmware: Vec::new(),
    }
}

pub(super) fn audit_full() -> AuditRecord {
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

pub(super) fn audit_minimal() -> AuditRecord {
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
