//! The tables SQL clients query: immutable Arrow snapshots of the twins, the recent
//! verdicts, alerts and commands, and the pipeline's status.
//!
//! The stream never waits for a query and a query never waits for the stream: the
//! core loop hands its changes over ([`SqlView::push_batch`], a short
//! lock on a staging area), a refresher thread folds them into its own copy every
//! `sql.refresh_ms` and publishes a new [`Tables`] behind an `Arc`; a query takes
//! that `Arc` and reads it for as long as it likes. The same view serves a running
//! instance (its own partitions) and `twinguard sql` (every twin, rebuilt from the
//! changelog topic): both feed it the same typed records.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use arrow::array::{Array, ArrayRef, BooleanBuilder, Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use twinguard_operators::{ChangelogRecord, Twin};
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::verdict::Verdict;
use twinguard_schemas::{EventSchema, Role};

use crate::config::Config;
use crate::engine::StateObserver;
use crate::obs::events::{RefreshLimitSet, SqlRefreshFailed, SqlSnapshotPublished, SqlViewTurned, TwinRowUndecodable};
use crate::obs::Metrics;
use crate::PipelineError;

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
            t.bindings.iter().map(|b| (b.field.clone(), serde_json::json!(b.values))).collect();
        TwinRow {
            device_id: t.device_id.clone(),
            partition: t.partition,
            schema: t.schema.clone(),
            device_type: r.device_type.clone(),
            criticality: r.criticality.map(|c| c.as_str().to_string()),
            first_seen_ms: t.first_seen_ms,
            last_seen_ms: t.last_seen_ms,
            events: i64::try_from(t.events).unwrap_or(i64::MAX),
            anomalies: i64::try_from(t.anomalies).unwrap_or(i64::MAX),
            rate_per_s: t.rate_per_s,
            score: t.score.map(f64::from),
            risk: f64::from(t.risk),
            class: t.class.clone(),
            firmware: r.reported.get("firmware_hash").cloned().or_else(|| t.firmware.clone()),
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

/// The view as the engine's [`StateObserver`]: batches, restored twins and dropped
/// partitions go to the view's staging area; changelog bytes become rows on the
/// view's refresher thread, not the engine's.
pub struct ViewFeed {
    view: Arc<SqlView>,
    rows: Arc<RowMaker>,
}

impl ViewFeed {
    /// A feed into `view` for the pipeline `cfg` describes (its event schema, and
    /// `sql.expose_phi`).
    pub fn for_config(view: Arc<SqlView>, cfg: &Config) -> Result<Arc<dyn StateObserver>, PipelineError> {
        let schema = cfg.event_schema()?;
        Ok(Arc::new(ViewFeed { view, rows: Arc::new(RowMaker::new(&schema, cfg.sql.expose_phi)) }))
    }
}

impl StateObserver for ViewFeed {
    fn batch(&self, consumed: Option<Instant>, verdicts: &[Verdict], alerts: &[Alert], commands: &[Command], twins: &[ChangelogRecord]) {
        let twins = twins
            .iter()
            .map(|c| {
                let staged = c.value.as_ref().map(|bytes| StagedTwin::Encoded { partition: c.partition, bytes: bytes.clone(), rows: self.rows.clone() });
                (c.key.clone(), staged)
            })
            .collect();
        self.view.push_batch(consumed, verdicts, alerts, commands, twins);
    }

    fn restored(&self, twins: &[&Twin]) {
        self.view.push_twins(None, twins.iter().map(|t| (t.device_id.clone(), Some(self.rows.row(t).into()))).collect());
    }

    fn partition_dropped(&self, partition: i32) {
        self.view.drop_partition(partition);
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
    fn partition(&self) -> i32 {
        match self {
            StagedTwin::Row(r) => r.partition,
            StagedTwin::Encoded { partition, .. } => *partition,
        }
    }

    fn into_row(self, key: &str) -> Option<TwinRow> {
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

/// One published snapshot: every table as Arrow batches.
#[derive(Debug, Clone)]
pub struct Tables {
    pub twins: Vec<RecordBatch>,
    pub verdicts: Vec<RecordBatch>,
    pub alerts: Vec<RecordBatch>,
    pub commands: Vec<RecordBatch>,
    pub status: Vec<RecordBatch>,
    /// When this snapshot was published (ms since the epoch).
    pub published_ms: i64,
}

/// The tables served, by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Twins,
    Verdicts,
    Alerts,
    Commands,
    Status,
}

impl Table {
    pub const ALL: [Table; 5] = [Table::Twins, Table::Verdicts, Table::Alerts, Table::Commands, Table::Status];
    pub fn name(self) -> &'static str {
        match self {
            Table::Twins => "twins",
            Table::Verdicts => "verdicts",
            Table::Alerts => "alerts",
            Table::Commands => "commands",
            Table::Status => "status",
        }
    }
    pub fn schema(self) -> SchemaRef {
        let ts = || DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
        let f = |n: &str, t: DataType, null: bool| Field::new(n, t, null);
        use DataType::{Boolean as B, Float64 as F, Int32 as I32, Int64 as I64, Utf8 as S};
        let fields = match self {
            Table::Twins => vec![
                f("device_id", S, false),
                f("partition", I32, false),
                f("schema", S, false),
                f("device_type", S, true),
                f("criticality", S, true),
                f("first_seen", ts(), false),
                f("last_seen", ts(), false),
                f("events", I64, false),
                f("anomalies", I64, false),
                f("rate_per_s", F, false),
                f("score", F, true),
                f("risk", F, false),
                f("class", S, true),
                f("firmware", S, true),
                f("reported", S, false),
                f("desired", S, false),
                f("delta", S, false),
                f("in_sync", B, false),
                f("pending_commands", I32, false),
                f("incident_id", S, true),
                f("latest", S, false),
                f("baselines", S, false),
                f("identity", S, false),
                f("peers", I32, false),
                f("last_offset", I64, false),
            ],
            Table::Verdicts => vec![
                f("device_id", S, false),
                f("event_time", ts(), true),
                f("topic", S, false),
                f("partition", I32, false),
                f("offset", I64, false),
                f("detector", S, false),
                f("score", F, false),
                f("threshold", F, true),
                f("anomalous", B, false),
                f("warming_up", B, false),
                f("attack_class", S, true),
                f("top_metric", S, true),
                f("top_z", F, true),
                f("identity_drift", S, true),
                f("model_version", S, true),
                f("score_rf", F, true),
                f("score_svm", F, true),
                f("score_lstm", F, true),
                f("score_twin", F, true),
                f("label", S, true),
            ],
            Table::Alerts => vec![
                f("alert_id", S, false),
                f("kind", S, false),
                f("device_id", S, false),
                f("device_type", S, true),
                f("criticality", S, true),
                f("event_time", ts(), true),
                f("detector", S, false),
                f("score", F, false),
                f("attack_class", S, true),
                f("model_version", S, true),
                f("incident_id", S, false),
                f("incident_alerts", I32, false),
                f("rule", S, false),
                f("action", S, false),
                f("automated", B, false),
                f("suspended", B, false),
                f("needs_human", B, false),
                f("command_id", S, true),
                f("note", S, true),
                f("features", S, false),
                f("identity_drift", S, true),
            ],
            Table::Commands => vec![
                f("command_id", S, false),
                f("device_id", S, false),
                f("action", S, false),
                f("desired", S, false),
                f("issued_at", ts(), true),
                f("expires_at", ts(), true),
                f("rule", S, false),
                f("alert_id", S, false),
                f("incident_id", S, false),
                f("attack_class", S, true),
                f("score", F, false),
            ],
            Table::Status => vec![
                f("instance", S, false),
                f("mode", S, false),
                f("started_at", ts(), false),
                f("ready", B, false),
                f("partitions", S, false),
                f("lag", I64, true),
                f("lag_by_partition", S, false),
                f("records_in", I64, false),
                f("records_per_s", F, false),
                f("verdicts_out", I64, false),
                f("anomalies", I64, false),
                f("alerts_out", I64, false),
                f("commands_out", I64, false),
                f("dead_letters", I64, false),
                f("twins", I64, false),
                f("twin_mem_bytes", I64, false),
                f("schema", S, false),
                f("model_version", S, true),
                f("gate_suspended", B, false),
                f("live_precision", F, true),
                f("live_detection_rate", F, true),
                f("live_fpr", F, true),
                f("feedback_labels", I64, false),
                f("response_ms_p99", F, true),
                f("snapshot_at", ts(), false),
            ],
        };
        Arc::new(Schema::new(fields))
    }
}

/// RFC 3339 → ms since the epoch (None when absent or unparsable).
fn rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

fn batch(table: Table, cols: Vec<ArrayRef>) -> RecordBatch {
    RecordBatch::try_new(table.schema(), cols).expect("columns match the table schema")
}

/// Rows per `twins` batch at most.
pub const TWINS_BATCH_ROWS: usize = 8192;
/// String bytes per `twins` batch at most (all string columns together): far below
/// the 2 GiB an Arrow `Utf8` column's i32 offsets can address, whatever the fleet's
/// size or its strings' length, and a quarter of what the SQL endpoint lets one
/// function call build per batch (`sql::server::MAX_VALUE_BATCH_BYTES`), so joining a
/// few columns of a batch stays within it.
pub const TWINS_BATCH_BYTES: usize = 8 << 20;

impl TwinRow {
    /// Bytes of this row's strings (what the `Utf8` columns' offsets count).
    fn string_bytes(&self) -> usize {
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

/// The `twins` table as batches of at most `max_rows` rows and (but for a single
/// larger row) `max_bytes` string bytes. One batch for everything would overflow
/// its 32-bit string offsets near 850 k twins (sooner with long strings). The view
/// keeps its chunks in [`TwinChunks`] (same bounds); this builds them in one go.
#[cfg(test)]
fn twins_batches<'a>(rows: impl Iterator<Item = &'a TwinRow>, max_rows: usize, max_bytes: usize) -> Vec<RecordBatch> {
    let mut out = Vec::new();
    let (mut chunk, mut bytes): (Vec<&TwinRow>, usize) = (Vec::new(), 0);
    for r in rows {
        let b = r.string_bytes();
        if !chunk.is_empty() && (chunk.len() >= max_rows || bytes + b > max_bytes) {
            out.push(twins_batch(&mut chunk.drain(..)));
            bytes = 0;
        }
        chunk.push(r);
        bytes += b;
    }
    if !chunk.is_empty() || out.is_empty() {
        out.push(twins_batch(&mut chunk.drain(..)));
    }
    out
}

fn twins_batch(rows: &mut dyn Iterator<Item = &TwinRow>) -> RecordBatch {
    let (mut dev, mut part, mut schema, mut dtype, mut crit) =
        (StringBuilder::new(), Int32Builder::new(), StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut first, mut last) = (TimestampMillisecondBuilder::new().with_timezone("UTC"), TimestampMillisecondBuilder::new().with_timezone("UTC"));
    let (mut events, mut anomalies, mut rate, mut score, mut risk, mut class, mut fw) =
        (Int64Builder::new(), Int64Builder::new(), Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut reported, mut desired, mut delta, mut in_sync, mut pending, mut incident) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), BooleanBuilder::new(), Int32Builder::new(), StringBuilder::new());
    let (mut latest, mut baselines, mut identity, mut peers, mut offset) =
        (StringBuilder::new(), StringBuilder::new(), StringBuilder::new(), Int32Builder::new(), Int64Builder::new());
    for r in rows {
        dev.append_value(&r.device_id);
        part.append_value(r.partition);
        schema.append_value(&r.schema);
        dtype.append_option(r.device_type.as_deref());
        crit.append_option(r.criticality.as_deref());
        first.append_value(r.first_seen_ms);
        last.append_value(r.last_seen_ms);
        events.append_value(r.events);
        anomalies.append_value(r.anomalies);
        rate.append_value(r.rate_per_s);
        score.append_option(r.score);
        risk.append_value(r.risk);
        class.append_option(r.class.as_deref());
        fw.append_option(r.firmware.as_deref());
        reported.append_value(&r.reported);
        desired.append_value(&r.desired);
        delta.append_value(&r.delta);
        in_sync.append_value(r.in_sync);
        pending.append_value(r.pending_commands);
        incident.append_option(r.incident_id.as_deref());
        latest.append_value(&r.latest);
        baselines.append_value(&r.baselines);
        identity.append_value(&r.identity);
        peers.append_value(r.peers);
        offset.append_value(r.last_offset);
    }
    batch(
        Table::Twins,
        vec![
            Arc::new(dev.finish()),
            Arc::new(part.finish()),
            Arc::new(schema.finish()),
            Arc::new(dtype.finish()),
            Arc::new(crit.finish()),
            Arc::new(first.finish()),
            Arc::new(last.finish()),
            Arc::new(events.finish()),
            Arc::new(anomalies.finish()),
            Arc::new(rate.finish()),
            Arc::new(score.finish()),
            Arc::new(risk.finish()),
            Arc::new(class.finish()),
            Arc::new(fw.finish()),
            Arc::new(reported.finish()),
            Arc::new(desired.finish()),
            Arc::new(delta.finish()),
            Arc::new(in_sync.finish()),
            Arc::new(pending.finish()),
            Arc::new(incident.finish()),
            Arc::new(latest.finish()),
            Arc::new(baselines.finish()),
            Arc::new(identity.finish()),
            Arc::new(peers.finish()),
            Arc::new(offset.finish()),
        ],
    )
}

fn verdicts_batch(rows: &VecDeque<Verdict>) -> RecordBatch {
    let ts = || TimestampMillisecondBuilder::new().with_timezone("UTC");
    let (mut dev, mut time, mut topic, mut part, mut off, mut det) =
        (StringBuilder::new(), ts(), StringBuilder::new(), Int32Builder::new(), Int64Builder::new(), StringBuilder::new());
    let (mut score, mut thr, mut anom, mut warm, mut class, mut top, mut topz, mut drift, mut ver) = (
        Float64Builder::new(),
        Float64Builder::new(),
        BooleanBuilder::new(),
        BooleanBuilder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
        Float64Builder::new(),
        StringBuilder::new(),
        StringBuilder::new(),
    );
    let (mut rf, mut svm, mut lstm, mut twin, mut label) =
        (Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), StringBuilder::new());
    for v in rows {
        dev.append_value(&v.device_id);
        time.append_option(rfc3339_ms(&v.event_time));
        topic.append_value(&v.source.topic);
        part.append_value(v.source.partition);
        off.append_value(v.source.offset);
        det.append_value(&v.detector);
        score.append_value(v.score);
        thr.append_option(v.threshold);
        anom.append_value(v.anomalous);
        warm.append_value(v.warming_up);
        class.append_option(v.attack_class.as_deref());
        top.append_option(v.top_metric.as_deref());
        topz.append_option(v.top_z);
        drift.append_option((!v.identity_drift.is_empty()).then(|| v.identity_drift.join(",")));
        ver.append_option(v.model_version.as_deref());
        rf.append_option(v.scores.as_ref().map(|s| s.rf));
        svm.append_option(v.scores.as_ref().map(|s| s.svm));
        lstm.append_option(v.scores.as_ref().map(|s| s.lstm));
        twin.append_option(v.scores.as_ref().map(|s| s.twin));
        label.append_option(v.label.as_deref());
    }
    batch(
        Table::Verdicts,
        vec![
            Arc::new(dev.finish()),
            Arc::new(time.finish()),
            Arc::new(topic.finish()),
            Arc::new(part.finish()),
            Arc::new(off.finish()),
            Arc::new(det.finish()),
            Arc::new(score.finish()),
            Arc::new(thr.finish()),
            Arc::new(anom.finish()),
            Arc::new(warm.finish()),
            Arc::new(class.finish()),
            Arc::new(top.finish()),
            Arc::new(topz.finish()),
            Arc::new(drift.finish()),
            Arc::new(ver.finish()),
            Arc::new(rf.finish()),
            Arc::new(svm.finish()),
            Arc::new(lstm.finish()),
            Arc::new(twin.finish()),
            Arc::new(label.finish()),
        ],
    )
}

fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

fn alerts_batch(rows: &VecDeque<Alert>) -> RecordBatch {
    let mut s: Vec<StringBuilder> = (0..21).map(|_| StringBuilder::new()).collect();
    let mut time = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let (mut score, mut n) = (Float64Builder::new(), Int32Builder::new());
    let (mut automated, mut suspended, mut human) = (BooleanBuilder::new(), BooleanBuilder::new(), BooleanBuilder::new());
    for a in rows {
        s[0].append_value(&a.alert_id);
        s[1].append_value(enum_str(&a.kind));
        s[2].append_value(&a.device_id);
        s[3].append_option(a.device_type.as_deref());
        s[4].append_option(a.criticality.map(|c| c.as_str()));
        time.append_option(rfc3339_ms(&a.event_time));
        s[6].append_value(&a.detector);
        score.append_value(a.score);
        s[8].append_option(a.attack_class.as_deref());
        s[9].append_option(a.model_version.as_deref());
        s[10].append_value(&a.incident_id);
        n.append_value(i32::try_from(a.incident_alerts).unwrap_or(i32::MAX));
        s[12].append_value(&a.response.rule);
        s[13].append_value(a.response.action.as_str());
        automated.append_value(a.response.automated);
        suspended.append_value(a.response.suspended);
        human.append_value(a.response.needs_human);
        s[17].append_option(a.response.command_id.as_deref().or(a.command_id.as_deref()));
        s[18].append_option(a.response.note.as_deref());
        s[19].append_value(serde_json::to_string(&a.features).expect("features serialise"));
        s[20].append_option((!a.identity_drift.is_empty()).then(|| a.identity_drift.join(",")));
    }
    let mut col = |i: usize| -> ArrayRef { Arc::new(s[i].finish()) };
    let cols: Vec<ArrayRef> = vec![
        col(0),
        col(1),
        col(2),
        col(3),
        col(4),
        Arc::new(time.finish()),
        col(6),
        Arc::new(score.finish()),
        col(8),
        col(9),
        col(10),
        Arc::new(n.finish()),
        col(12),
        col(13),
        Arc::new(automated.finish()),
        Arc::new(suspended.finish()),
        Arc::new(human.finish()),
        col(17),
        col(18),
        col(19),
        col(20),
    ];
    batch(Table::Alerts, cols)
}

fn commands_batch(rows: &VecDeque<Command>) -> RecordBatch {
    let mut s: Vec<StringBuilder> = (0..11).map(|_| StringBuilder::new()).collect();
    let (mut issued, mut expires) = (TimestampMillisecondBuilder::new().with_timezone("UTC"), TimestampMillisecondBuilder::new().with_timezone("UTC"));
    let mut score = Float64Builder::new();
    for c in rows {
        s[0].append_value(&c.command_id);
        s[1].append_value(&c.device_id);
        s[2].append_value(c.action.as_str());
        s[3].append_value(serde_json::to_string(&c.desired).expect("map serialises"));
        issued.append_option(rfc3339_ms(&c.issued_at));
        expires.append_option(rfc3339_ms(&c.expires_at));
        s[6].append_value(&c.reason.rule);
        s[7].append_value(&c.reason.alert_id);
        s[8].append_value(&c.reason.incident_id);
        s[9].append_option(c.reason.attack_class.as_deref());
        score.append_value(c.reason.score);
    }
    let mut col = |i: usize| -> ArrayRef { Arc::new(s[i].finish()) };
    let cols: Vec<ArrayRef> =
        vec![col(0), col(1), col(2), col(3), Arc::new(issued.finish()), Arc::new(expires.finish()), col(6), col(7), col(8), col(9), Arc::new(score.finish())];
    batch(Table::Commands, cols)
}

fn status_batch(r: &StatusRow, now_ms: i64) -> RecordBatch {
    let one_s = |v: &str| -> ArrayRef { Arc::new(arrow::array::StringArray::from(vec![v.to_string()])) };
    let opt_s = |v: Option<&str>| -> ArrayRef { Arc::new(arrow::array::StringArray::from(vec![v.map(str::to_string)])) };
    let i = |v: i64| -> ArrayRef { Arc::new(arrow::array::Int64Array::from(vec![v])) };
    let oi = |v: Option<i64>| -> ArrayRef { Arc::new(arrow::array::Int64Array::from(vec![v])) };
    let f = |v: Option<f64>| -> ArrayRef { Arc::new(arrow::array::Float64Array::from(vec![v])) };
    let b = |v: bool| -> ArrayRef { Arc::new(arrow::array::BooleanArray::from(vec![v])) };
    let t = |v: i64| -> ArrayRef { Arc::new(arrow::array::TimestampMillisecondArray::from(vec![v]).with_timezone("UTC")) };
    batch(
        Table::Status,
        vec![
            one_s(&r.instance),
            one_s(&r.mode),
            t(r.started_ms),
            b(r.ready),
            one_s(&r.partitions),
            oi(r.lag),
            one_s(&r.lag_by_partition),
            i(r.records_in),
            f(Some(r.records_per_s)),
            i(r.verdicts_out),
            i(r.anomalies),
            i(r.alerts_out),
            i(r.commands_out),
            i(r.dead_letters),
            i(r.twins),
            i(r.twin_mem_bytes),
            one_s(&r.schema),
            opt_s(r.model_version.as_deref()),
            b(r.gate_suspended),
            f(r.live_precision),
            f(r.live_detection_rate),
            f(r.live_fpr),
            i(r.feedback_labels),
            f(r.response_ms_p99),
            t(now_ms),
        ],
    )
}

/// Changes handed over by the stream since the last refresh.
#[derive(Default)]
struct Staged {
    twins: HashMap<String, Option<StagedTwin>>,
    dropped_partitions: Vec<i32>,
    verdicts: Vec<Verdict>,
    alerts: Vec<Alert>,
    commands: Vec<Command>,
    /// When the oldest staged change was consumed from Kafka.
    oldest: Option<Instant>,
}

/// Supplies the `status` row at every refresh.
pub type StatusFn = Box<dyn Fn() -> StatusRow + Send + Sync>;

/// The shared view: staging area (written by the stream) and the published snapshot
/// (read by queries).
pub struct SqlView {
    staged: Mutex<Staged>,
    published: RwLock<Arc<Tables>>,
    recent_rows: usize,
    /// Publications so far (tests wait on it).
    generation: std::sync::atomic::AtomicU64,
    /// For the last [`FRESHNESS_SAMPLES`] publications that carried changes: their
    /// oldest change's consumption to publication, in ms.
    freshness: Mutex<VecDeque<f64>>,
    /// Rows of the published `twins` table, and the bytes of its Arrow buffers.
    twins_rows: std::sync::atomic::AtomicU64,
    twins_bytes: std::sync::atomic::AtomicU64,
}

/// Freshness figures kept for [`SqlView::freshness_ms`].
const FRESHNESS_SAMPLES: usize = 10_000;

impl std::fmt::Debug for SqlView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqlView").field("recent_rows", &self.recent_rows).finish_non_exhaustive()
    }
}

impl SqlView {
    pub fn new(recent_rows: usize) -> Arc<SqlView> {
        let empty = |t: Table| vec![RecordBatch::new_empty(t.schema())];
        Arc::new(SqlView {
            staged: Mutex::new(Staged::default()),
            published: RwLock::new(Arc::new(Tables {
                twins: empty(Table::Twins),
                verdicts: empty(Table::Verdicts),
                alerts: empty(Table::Alerts),
                commands: empty(Table::Commands),
                status: empty(Table::Status),
                published_ms: 0,
            })),
            recent_rows: recent_rows.max(1),
            generation: Default::default(),
            freshness: Mutex::new(VecDeque::new()),
            twins_rows: Default::default(),
            twins_bytes: Default::default(),
        })
    }

    /// The current snapshot (a pointer copy; never waits for the stream).
    pub fn snapshot(&self) -> Arc<Tables> {
        self.published.read().expect("snapshot lock").clone()
    }

    /// Recent freshness figures (ms, oldest first): for each publication that carried
    /// changes, its oldest change's consumption from Kafka until it was visible.
    pub fn freshness_ms(&self) -> Vec<f64> {
        self.freshness.lock().expect("freshness lock").iter().copied().collect()
    }

    /// Rows of the `twins` table as last published.
    pub fn twins_rows(&self) -> u64 {
        self.twins_rows.load(Ordering::Relaxed)
    }

    /// Bytes of the `twins` table's Arrow buffers as last published: the view's
    /// memory for the fleet (each twin is held once, in these buffers; changes
    /// waiting for the next refresh come on top).
    pub fn twins_bytes(&self) -> u64 {
        self.twins_bytes.load(Ordering::Relaxed)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn stage(&self, consumed: Option<Instant>, f: impl FnOnce(&mut Staged)) {
        let mut s = self.staged.lock().expect("staging lock");
        f(&mut s);
        if let Some(c) = consumed {
            s.oldest = Some(s.oldest.map_or(c, |o| o.min(c)));
        }
    }

    /// New or changed twins (`None` = the twin is gone).
    pub fn push_twins(&self, consumed: Option<Instant>, rows: Vec<(String, Option<StagedTwin>)>) {
        self.push_batch(consumed, &[], &[], &[], rows);
    }

    /// This instance no longer owns `partition`: its twins leave the view.
    pub fn drop_partition(&self, partition: i32) {
        self.stage(None, |s| {
            s.twins.retain(|_, r| r.as_ref().is_none_or(|r| r.partition() != partition));
            s.dropped_partitions.push(partition);
        });
    }

    /// One batch's outputs and twin changes, staged together: no snapshot shows
    /// part of a batch.
    pub fn push_batch(&self, consumed: Option<Instant>, verdicts: &[Verdict], alerts: &[Alert], commands: &[Command], twins: Vec<(String, Option<StagedTwin>)>) {
        if verdicts.is_empty() && alerts.is_empty() && commands.is_empty() && twins.is_empty() {
            return;
        }
        let cap = self.recent_rows;
        self.stage(consumed, |s| {
            s.twins.extend(twins);
            // Only the newest `cap` of each can survive the next refresh anyway.
            fn keep<T>(v: &mut Vec<T>, cap: usize) {
                if v.len() > cap {
                    v.drain(..v.len() - cap);
                }
            }
            s.verdicts.extend(verdicts.iter().rev().take(cap).rev().cloned());
            keep(&mut s.verdicts, cap);
            s.alerts.extend_from_slice(alerts);
            keep(&mut s.alerts, cap);
            s.commands.extend_from_slice(commands);
            keep(&mut s.commands, cap);
        });
    }

    /// Run the refresher on a thread of its own until `stop`: every `every`, fold the
    /// staged changes in and publish a new snapshot. A refresh that fails (panics) is
    /// reported ([`SqlRefreshFailed`]) and the next one tries again; each turn is a
    /// heartbeat in `metrics`, so `/healthz` fails if the thread stops turning.
    pub fn spawn_refresher(self: &Arc<Self>, every: Duration, status: StatusFn, metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> std::io::Result<std::thread::JoinHandle<()>> {
        let view = self.clone();
        // A refresh of a large fleet takes a while: generous, but bounded.
        let limit = (every * 20).max(Duration::from_secs(60));
        RefreshLimitSet { millis: i64::try_from(limit.as_millis()).unwrap_or(i64::MAX) }.emit(&metrics);
        let beat = |m: &Metrics| SqlViewTurned.emit(m);
        beat(&metrics);
        std::thread::Builder::new().name("tg-sql-view".into()).spawn(move || {
            let mut r = Refresher::new(view.recent_rows);
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                view.refresh_reported(&mut r, &status, &metrics);
                beat(&metrics);
                std::thread::sleep(every.saturating_sub(started.elapsed()));
            }
        })
    }

    /// One refresh; a panic in it is caught and reported instead of ending the
    /// thread (the refresher's state stays usable: the tables are rebuilt whole).
    fn refresh_reported(&self, r: &mut Refresher, status: &StatusFn, metrics: &Metrics) {
        if let Err(panic) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.refresh(r, status))) {
            let error = panic.downcast_ref::<String>().map(String::as_str).or_else(|| panic.downcast_ref::<&str>().copied()).unwrap_or("panic");
            SqlRefreshFailed { error }.emit(metrics);
        }
    }

    fn refresh(&self, r: &mut Refresher, status: &StatusFn) {
        let staged = std::mem::take(&mut *self.staged.lock().expect("staging lock"));
        let prev = self.snapshot();
        let mut next = (*prev).clone();
        let now = chrono::Utc::now().timestamp_millis();
        if !staged.dropped_partitions.is_empty() || !staged.twins.is_empty() {
            for p in &staged.dropped_partitions {
                r.pending.retain(|_, t| t.as_ref().is_none_or(|t| t.partition != *p));
                r.twins.drop_partition(*p);
            }
            for (k, change) in staged.twins {
                // A tombstone, or a change that does not decode (logged in
                // `into_row`: better no row than a stale one), removes the row.
                let row = change.and_then(|t| t.into_row(&k));
                r.pending.insert(k, row);
            }
            r.twins_changed = true;
        }
        if !r.pending.is_empty() {
            // Taken only once folded in: a refresh that fails keeps them for the next.
            r.twins.apply(&r.pending);
            r.pending.clear();
        }
        // Still set if the last refresh failed after changing the rows.
        if r.twins_changed {
            next.twins = r.twins.batches();
            self.twins_rows.store(r.twins.rows() as u64, Ordering::Relaxed);
            self.twins_bytes.store(r.twins.mem_bytes() as u64, Ordering::Relaxed);
        }
        let cap = self.recent_rows;
        fn trim<T>(q: &mut VecDeque<T>, cap: usize) {
            while q.len() > cap {
                q.pop_front();
            }
        }
        if !staged.verdicts.is_empty() {
            r.verdicts.extend(staged.verdicts);
            trim(&mut r.verdicts, cap);
            next.verdicts = vec![verdicts_batch(&r.verdicts)];
        }
        if !staged.alerts.is_empty() {
            r.alerts.extend(staged.alerts);
            trim(&mut r.alerts, cap);
            next.alerts = vec![alerts_batch(&r.alerts)];
        }
        if !staged.commands.is_empty() {
            r.commands.extend(staged.commands);
            trim(&mut r.commands, cap);
            next.commands = vec![commands_batch(&r.commands)];
        }
        next.status = vec![status_batch(&status(), now)];
        next.published_ms = now;
        *self.published.write().expect("snapshot lock") = Arc::new(next);
        r.twins_changed = false;
        if let Some(o) = staged.oldest {
            let age = o.elapsed();
            SqlSnapshotPublished { age }.emit();
            let mut f = self.freshness.lock().expect("freshness lock");
            if f.len() == FRESHNESS_SAMPLES {
                f.pop_front();
            }
            f.push_back(age.as_secs_f64() * 1000.0);
        }
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// The refresher's own state (only its thread touches it).
struct Refresher {
    /// The `twins` table itself: the published batches are these chunks (shared, not
    /// copied), so a twin is held once, as Arrow columns.
    twins: TwinChunks,
    /// Row changes taken from staging and not yet folded into `twins`.
    pending: BTreeMap<String, Option<TwinRow>>,
    /// The rows changed since the `twins` table was last published.
    twins_changed: bool,
    verdicts: VecDeque<Verdict>,
    alerts: VecDeque<Alert>,
    commands: VecDeque<Command>,
}

impl Refresher {
    fn new(cap: usize) -> Self {
        let c = cap.min(1 << 16);
        Refresher {
            twins: TwinChunks::new(TWINS_BATCH_ROWS, TWINS_BATCH_BYTES),
            pending: BTreeMap::new(),
            twins_changed: false,
            verdicts: VecDeque::with_capacity(c),
            alerts: VecDeque::new(),
            commands: VecDeque::new(),
        }
    }
}

/// Columns of the `twins` table that are strings (what [`TwinRow::string_bytes`] counts).
fn twins_string_columns() -> Vec<usize> {
    Table::Twins.schema().fields().iter().enumerate().filter(|(_, f)| f.data_type() == &DataType::Utf8).map(|(i, _)| i).collect()
}

/// The `twins` table as chunks sorted by `device_id`, each a [`RecordBatch`] of at
/// most `max_rows` rows and (but for a single larger row) `max_bytes` string bytes,
/// keyed by its first device. A refresh rebuilds only the chunks its changes fall
/// in (merging the changed rows into them), and the snapshot shares the chunks, so
/// the fleet is held once, as exactly sized Arrow buffers: no row structs, no
/// per-row strings, no second copy of unchanged rows while a refresh builds.
struct TwinChunks {
    chunks: BTreeMap<String, RecordBatch>,
    max_rows: usize,
    max_bytes: usize,
    strings: Vec<usize>,
    rows: usize,
    mem_bytes: usize,
}

/// Where a row of a rebuilt chunk comes from: the old chunk (0) or the changed rows (1).
type Source = (usize, usize);

impl TwinChunks {
    fn new(max_rows: usize, max_bytes: usize) -> Self {
        TwinChunks { chunks: BTreeMap::new(), max_rows: max_rows.max(1), max_bytes, strings: twins_string_columns(), rows: 0, mem_bytes: 0 }
    }

    fn rows(&self) -> usize {
        self.rows
    }

    /// Bytes of the Arrow buffers held (all chunks).
    fn mem_bytes(&self) -> usize {
        self.mem_bytes
    }

    /// The table as published: the chunks in device order (one empty batch if none).
    fn batches(&self) -> Vec<RecordBatch> {
        if self.chunks.is_empty() {
            return vec![RecordBatch::new_empty(Table::Twins.schema())];
        }
        self.chunks.values().cloned().collect()
    }

    fn ids(b: &RecordBatch) -> &arrow::array::StringArray {
        b.column(0).as_any().downcast_ref().expect("device_id is Utf8")
    }

    fn put(&mut self, b: RecordBatch) {
        if b.num_rows() == 0 {
            return;
        }
        self.rows += b.num_rows();
        self.mem_bytes += b.get_array_memory_size();
        self.chunks.insert(Self::ids(&b).value(0).to_string(), b);
    }

    fn take(&mut self, first: &str) -> Option<RecordBatch> {
        let b = self.chunks.remove(first)?;
        self.rows -= b.num_rows();
        self.mem_bytes -= b.get_array_memory_size();
        Some(b)
    }

    /// The row of `device`, read back from the columns.
    #[cfg(test)]
    fn get(&self, device: &str) -> Option<TwinRow> {
        let (_, b) = self.chunks.range::<str, _>((std::ops::Bound::Unbounded, std::ops::Bound::Included(device))).next_back()?;
        let ids = Self::ids(b);
        let (mut lo, mut hi) = (0, ids.len());
        while lo < hi {
            let mid = (lo + hi) / 2;
            if ids.value(mid) < device {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        (lo < ids.len() && ids.value(lo) == device).then(|| row_at(b, lo))
    }

    /// Every row of `partition` leaves (only the chunks holding one are rebuilt).
    fn drop_partition(&mut self, partition: i32) {
        let hit: Vec<String> = self
            .chunks
            .iter()
            .filter(|(_, b)| b.column(1).as_any().downcast_ref::<arrow::array::Int32Array>().expect("partition is Int32").values().contains(&partition))
            .map(|(k, _)| k.clone())
            .collect();
        for k in hit {
            let b = &self.chunks[&k];
            let keep = arrow::compute::kernels::cmp::neq(b.column(1), &arrow::array::Int32Array::new_scalar(partition)).expect("Int32 comparison");
            // Exactly sized again (filtering allocates for the rows kept).
            let kept = arrow::compute::filter_record_batch(b, &keep).expect("filter the chunk");
            self.take(&k);
            self.put(kept);
        }
    }

    /// Fold `changes` (device → new row, or `None`: the row leaves) in, rebuilding
    /// the chunks they fall in; a chunk that grows past the bounds is split.
    fn apply(&mut self, changes: &BTreeMap<String, Option<TwinRow>>) {
        // The chunk a device falls in: the last one starting at or before it (the
        // first chunk for a device before all of them).
        let firsts: Vec<String> = self.chunks.keys().cloned().collect();
        let mut groups: BTreeMap<Option<usize>, Vec<(&str, Option<&TwinRow>)>> = BTreeMap::new();
        for (k, v) in changes {
            let at = (!firsts.is_empty()).then(|| firsts.partition_point(|f| f.as_str() <= k.as_str()).saturating_sub(1));
            groups.entry(at).or_default().push((k, v.as_ref()));
        }
        for (at, changes) in groups {
            // Built before the old chunk is replaced: a refresh that fails half-way
            // leaves every chunk whole (and the changes pending, to be applied again).
            let merged = self.merge(at.map(|i| &self.chunks[&firsts[i]]), &changes);
            if let Some(i) = at {
                self.take(&firsts[i]);
            }
            for b in merged {
                self.put(b);
            }
        }
    }

    /// One chunk (`old`, if any) with its sorted `changes` merged in, as chunks
    /// within the bounds.
    fn merge(&self, old: Option<&RecordBatch>, changes: &[(&str, Option<&TwinRow>)]) -> Vec<RecordBatch> {
        let fresh_rows: Vec<&TwinRow> = changes.iter().filter_map(|(_, r)| *r).collect();
        let fresh = twins_batch(&mut fresh_rows.iter().copied());
        let old_ids = old.map(Self::ids);
        let n_old = old_ids.map_or(0, |a| a.len());
        let old_bytes = |i: usize| -> usize {
            let b = old.expect("an old row");
            self.strings
                .iter()
                .map(|&c| {
                    let o = b.column(c).as_any().downcast_ref::<arrow::array::StringArray>().expect("Utf8 column").value_offsets();
                    (o[i + 1] - o[i]) as usize
                })
                .sum()
        };
        // Merge by device: a changed device takes its new row (or none), others keep theirs.
        let mut order: Vec<(Source, usize)> = Vec::with_capacity(n_old + fresh_rows.len());
        let (mut i, mut j, mut f) = (0, 0, 0);
        while i < n_old || j < changes.len() {
            let o = (i < n_old).then(|| old_ids.expect("old ids").value(i));
            let c = changes.get(j);
            match (o, c) {
                (Some(o), Some((k, _))) if o < *k => {
                    order.push(((0, i), old_bytes(i)));
                    i += 1;
                }
                (Some(_), None) => {
                    order.push(((0, i), old_bytes(i)));
                    i += 1;
                }
                (o, Some((k, row))) => {
                    if o == Some(*k) {
                        i += 1; // replaced or removed
                    }
                    if let Some(r) = row {
                        order.push(((1, f), r.string_bytes()));
                        f += 1;
                    }
                    j += 1;
                }
                (None, None) => unreachable!("loop condition"),
            }
        }
        let mut out = Vec::new();
        let (mut start, mut bytes) = (0, 0);
        for (n, (_, b)) in order.iter().enumerate() {
            if n > start && (n - start >= self.max_rows || bytes + b > self.max_bytes) {
                out.push(Self::gather(old, &fresh, &order[start..n]));
                (start, bytes) = (n, 0);
            }
            bytes += b;
        }
        if order.len() > start {
            out.push(Self::gather(old, &fresh, &order[start..]));
        }
        out
    }

    /// The rows `picks` of `old` and `fresh`, in that order, as one exactly sized batch.
    fn gather(old: Option<&RecordBatch>, fresh: &RecordBatch, picks: &[(Source, usize)]) -> RecordBatch {
        let idx: Vec<Source> = picks.iter().map(|(s, _)| *s).collect();
        let cols = (0..fresh.num_columns())
            .map(|c| {
                let empty;
                let o: &dyn arrow::array::Array = match old {
                    Some(b) => b.column(c).as_ref(),
                    None => {
                        empty = fresh.column(c).slice(0, 0);
                        empty.as_ref()
                    }
                };
                arrow::compute::interleave(&[o, fresh.column(c).as_ref()], &idx).expect("columns of the twins table")
            })
            .collect();
        batch(Table::Twins, cols)
    }
}

/// Row `i` of a `twins` batch, read back.
#[cfg(test)]
fn row_at(b: &RecordBatch, i: usize) -> TwinRow {
    use arrow::array::AsArray;
    use arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMillisecondType};
    let s = |c: usize| b.column(c).as_string::<i32>().value(i).to_string();
    let os = |c: usize| {
        let a = b.column(c).as_string::<i32>();
        a.is_valid(i).then(|| a.value(i).to_string())
    };
    let i32c = |c: usize| b.column(c).as_primitive::<Int32Type>().value(i);
    let i64c = |c: usize| b.column(c).as_primitive::<Int64Type>().value(i);
    let ts = |c: usize| b.column(c).as_primitive::<TimestampMillisecondType>().value(i);
    let f = |c: usize| b.column(c).as_primitive::<Float64Type>().value(i);
    let score = b.column(10).as_primitive::<Float64Type>();
    TwinRow {
        device_id: s(0),
        partition: i32c(1),
        schema: s(2),
        device_type: os(3),
        criticality: os(4),
        first_seen_ms: ts(5),
        last_seen_ms: ts(6),
        events: i64c(7),
        anomalies: i64c(8),
        rate_per_s: f(9),
        score: score.is_valid(i).then(|| score.value(i)),
        risk: f(11),
        class: os(12),
        firmware: os(13),
        reported: s(14),
        desired: s(15),
        delta: s(16),
        in_sync: b.column(17).as_boolean().value(i),
        pending_commands: i32c(18),
        incident_id: os(19),
        latest: s(20),
        baselines: s(21),
        identity: s(22),
        peers: i32c(23),
        last_offset: i64c(24),
    }
}

/// A table of the view for DataFusion: every scan reads the snapshot current at
/// planning time.
#[derive(Debug)]
pub struct ViewTable {
    pub view: Arc<SqlView>,
    pub table: Table,
    schema: SchemaRef,
}

impl ViewTable {
    pub fn new(view: Arc<SqlView>, table: Table) -> Self {
        ViewTable { view, table, schema: table.schema() }
    }
}

#[async_trait::async_trait]
impl datafusion::catalog::TableProvider for ViewTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
    fn table_type(&self) -> datafusion::logical_expr::TableType {
        datafusion::logical_expr::TableType::Base
    }
    async fn scan(
        &self,
        _state: &dyn datafusion::catalog::Session,
        projection: Option<&Vec<usize>>,
        _filters: &[datafusion::logical_expr::Expr],
        _limit: Option<usize>,
    ) -> datafusion::error::Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>> {
        let snap = self.view.snapshot();
        let batches = match self.table {
            Table::Twins => &snap.twins,
            Table::Verdicts => &snap.verdicts,
            Table::Alerts => &snap.alerts,
            Table::Commands => &snap.commands,
            Table::Status => &snap.status,
        };
        Ok(datafusion::catalog::memory::MemorySourceConfig::try_new_exec(&[batches.clone()], self.schema.clone(), projection.cloned())?)
    }
}

#[cfg(test)]
mod tests;
