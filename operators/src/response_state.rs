//! The response side of a twin, as data: open incident, commands awaiting their
//! acknowledgement, what commands asked the device to be and what it reports.
//! The twin holds it (and the changelog carries it); the responder
//! ([`crate::respond`]) changes it. A leaf: it imports neither.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use twinguard_schemas::respond::{Action, Criticality};

/// An open incident of a device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: String,
    pub opened_ms: i64,
    pub last_ms: i64,
    pub alerts: u32,
    /// Commands already issued in this incident (never repeated).
    pub actions: Vec<Action>,
}

/// A command awaiting the device's acknowledgement.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingCommand {
    pub command_id: String,
    pub action: Action,
    pub issued_ms: i64,
    pub expires_ms: i64,
    pub desired: BTreeMap<String, String>,
}

/// The response side of a twin.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResponseState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub criticality: Option<Criticality>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub incident: Option<Incident>,
    /// What commands asked the device to be.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub desired: BTreeMap<String, String>,
    /// What the device says it is (acks; `firmware_hash` from telemetry).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub reported: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pending: Vec<PendingCommand>,
    /// The last few commands that expired unacknowledged (a late ack still
    /// reconciles them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expired: Vec<PendingCommand>,
}

/// Expired commands remembered per twin for late acknowledgements.
pub(crate) const REMEMBER_EXPIRED: usize = 8;

impl ResponseState {
    /// No state at all.
    pub const EMPTY: ResponseState = ResponseState {
        device_type: None,
        criticality: None,
        incident: None,
        desired: BTreeMap::new(),
        reported: BTreeMap::new(),
        pending: Vec::new(),
        expired: Vec::new(),
    };

    pub fn is_empty(&self) -> bool {
        *self == ResponseState::default()
    }

    /// Desired entries the device does not (yet) report.
    pub fn delta(&self) -> BTreeMap<String, String> {
        self.desired.iter().filter(|(k, v)| self.reported.get(*k) != Some(*v)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    pub fn mem_bytes(&self) -> usize {
        if self.is_empty() {
            return 0;
        }
        let map = |m: &BTreeMap<String, String>| m.iter().map(|(k, v)| 48 + k.capacity() + v.capacity()).sum::<usize>();
        self.device_type.as_ref().map_or(0, String::capacity)
            + self.incident.as_ref().map_or(0, |i| std::mem::size_of::<Incident>() + i.id.capacity() + i.actions.capacity())
            + map(&self.desired)
            + map(&self.reported)
            + self.pending.iter().chain(&self.expired).map(|p| std::mem::size_of::<PendingCommand>() + p.command_id.capacity() + map(&p.desired)).sum::<usize>()
    }
}
