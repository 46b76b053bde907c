//! Rows as the view holds them: a twin's row (`TwinRow`, made by `RowMaker`), a staged
//! change (`StagedTwin`), the `status` row.

use super::*;

/// One device's row of the `twins` table, built from its twin (on the stream's
/// thread for its own twins, from the changelog in `twinguard sql`).
#[derive(Debug, Clone, PartialEq)]
pub struct TwinRow {
    pub device_id: String,
    pub partition: i32,
    pub schema: String,
    pub device_type: Option<String>,
    pub criticality: Option<String>,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub events: i64,
    pub anomalies: i64,
    pub rate_per_s: f64,
    pub score: Option<f64>,
    pub risk: f64,
    pub class: Option<String>,
    pub firmware: Option<String>,
    pub reported: String,
    pub desired: String,
    pub delta: String,
    pub in_sync: bool,
    pub pending_commands: i32,
    pub incident_id: Option<String>,
    pub latest: String,
    pub baselines: String,
    pub identity: String,
    pub peers: i32,
    pub last_offset: i64,
}

/// Turns twins into rows for one event schema: metric names for the JSON columns,
/// and which metrics are patient vital signs (left out unless configured).
#[derive(Debug, Clone)]
pub struct RowMaker {
    metrics: Vec<(String, bool)>,
    expose_phi: bool,
}

impl RowMaker {
    pub fn new(schema: &EventSchema, expose_phi: bool) -> Self {
        let metrics = schema.indices_of(Role::Metric).into_iter().map(|i| (schema.fields[i].name.clone(), schema.fields[i].phi)).collect();
        RowMaker { metrics, expose_phi }
    }

    pub fn row(&self, t: &Twin) -> TwinRow {
        let r = t.response();
        let json = |m: &BTreeMap<String, String>| serde_json::to_string(m).expect("map serialises");
        let delta = r.delta();
        let mut latest = serde_json::Map::new();
        let mut baselines = serde_json::Map::new();
        for (i, (name, phi)) in self.metrics.iter().enumerate() {
            if *phi && !self.expose_phi {
                continue;
            }
            if let Some(x) = t.latest.get(i).copied().filter(|x| x.is_finite()) {
                latest.insert(name.clone(), serde_json::json!(x));
            }
            if let Some(b) = t.baselines.get(i).filter(|b| b.n > 0) {
                baselines.insert(name.clone(), serde_json::json!({"mean": b.mean, "sd": f64::from(b.var).sqrt(), "n": b.n}));
            }
        }
        let identity: serde_json::Map<String, serde_json::Value> =
            t.bindings.iter().map(|b| (b.field.to_string(), serde_json::json!(b.values))).collect();
        TwinRow {
            device_id: t.device_id.to_string(),
            partition: t.partition,
            schema: t.schema.to_string(),
            device_type: r.device_type.clone(),
            criticality: r.criticality.map(|c| c.as_str().to_string()),
            first_seen_ms: t.first_seen_ms,
            last_seen_ms: t.last_seen_ms,
            events: i64::try_from(t.events).unwrap_or(i64::MAX),
            anomalies: i64::try_from(t.anomalies).unwrap_or(i64::MAX),
            rate_per_s: t.rate_per_s,
            score: t.score.map(f64::from),
            risk: f64::from(t.risk),
            class: t.class.as_ref().map(ToString::to_string),
            firmware: r.reported.get("firmware_hash").cloned().or_else(|| t.firmware.as_ref().map(ToString::to_string)),
            reported: json(&r.reported),
            desired: json(&r.desired),
            in_sync: delta.is_empty(),
            delta: json(&delta),
            pending_commands: i32::try_from(r.pending.len()).unwrap_or(i32::MAX),
            incident_id: r.incident.as_ref().map(|i| i.id.clone()),
            latest: serde_json::Value::Object(latest).to_string(),
            baselines: serde_json::Value::Object(baselines).to_string(),
            identity: serde_json::Value::Object(identity).to_string(),
            peers: i32::try_from(t.peers.len()).unwrap_or(i32::MAX),
            last_offset: t.last_offset,
        }
    }
}

/// A twin change waiting for the next refresh: a ready row, or the twin as encoded
/// for the changelog. The stream's core thread stages the encoded bytes (a copy);
/// the refresher decodes them and builds the row on its own thread, so the JSON
/// columns never cost the stream time.
#[derive(Debug, Clone)]
pub enum StagedTwin {
    Row(TwinRow),
    Encoded { partition: i32, bytes: Vec<u8>, rows: Arc<RowMaker> },
}

impl StagedTwin {
    pub(super) fn partition(&self) -> i32 {
        match self {
            StagedTwin::Row(r) => r.partition,
            StagedTwin::Encoded { partition, .. } => *partition,
        }
    }

    pub(super) fn into_row(self, key: &str) -> Option<TwinRow> {
        match self {
            StagedTwin::Row(r) => Some(r),
            StagedTwin::Encoded { bytes, rows, .. } => match Twin::decode(key, &bytes) {
                Ok(t) => Some(rows.row(&t)),
                Err(e) => {
                    // The stream encoded these bytes itself: this would be a bug.
                    TwinRowUndecodable { device: key, error: &e.to_string() }.emit();
                    None
                }
            },
        }
    }
}

impl From<TwinRow> for StagedTwin {
    fn from(r: TwinRow) -> Self {
        StagedTwin::Row(r)
    }
}

/// The pipeline's own state, one row of the `status` table.
#[derive(Debug, Clone, Default)]
pub struct StatusRow {
    pub instance: String,
    /// `pipeline` (an instance serving its own partitions) or `global` (`twinguard sql`).
    pub mode: String,
    pub started_ms: i64,
    pub ready: bool,
    /// Partitions this process owns (pipeline) or reads (global), e.g. `0,2,4`.
    pub partitions: String,
    /// Records behind the end of the owned partitions (input topic, or changelog for global).
    pub lag: Option<i64>,
    /// Lag per partition as JSON (`{"0": 12, ...}`).
    pub lag_by_partition: String,
    pub records_in: i64,
    pub records_per_s: f64,
    pub verdicts_out: i64,
    pub anomalies: i64,
    pub alerts_out: i64,
    pub commands_out: i64,
    pub dead_letters: i64,
    pub twins: i64,
    pub twin_mem_bytes: i64,
    pub schema: String,
    pub model_version: Option<String>,
    pub gate_suspended: bool,
    pub live_precision: Option<f64>,
    pub live_detection_rate: Option<f64>,
    pub live_fpr: Option<f64>,
    pub feedback_labels: i64,
    pub response_ms_p99: Option<f64>,
}

impl TwinRow {
    /// Bytes of this row's strings (what the `Utf8` columns' offsets count).
    pub(super) fn string_bytes(&self) -> usize {
        let opt = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        self.device_id.len()
            + self.schema.len()
            + opt(&self.device_type)
            + opt(&self.criticality)
            + opt(&self.class)
            + opt(&self.firmware)
            + self.reported.len()
            + self.desired.len()
            + self.delta.len()
            + opt(&self.incident_id)
            + self.latest.len()
            + self.baselines.len()
            + self.identity.len()
    }
}
