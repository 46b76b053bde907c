//! The tables' Arrow schemas (`Table`) and the batches built from rows: twins in
//! bounded chunks, recent verdicts, alerts and commands, the status row.

use super::*;

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
    // Kept whole: every table's columns in one list, read as the SQL reference.
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
                f("score_gbdt", F, true),
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
pub(super) fn rfc3339_ms(s: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(s).ok().map(|t| t.timestamp_millis())
}

pub(super) fn batch(table: Table, cols: Vec<ArrayRef>) -> RecordBatch {
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

/// The `twins` table as batches of at most `max_rows` rows and (but for a single
/// larger row) `max_bytes` string bytes. One batch for everything would overflow
/// its 32-bit string offsets near 850 k twins (sooner with long strings). The view
/// keeps its chunks in [`TwinChunks`] (same bounds); this builds them in one go.
#[cfg(test)]
pub(super) fn twins_batches<'a>(rows: impl Iterator<Item = &'a TwinRow>, max_rows: usize, max_bytes: usize) -> Vec<RecordBatch> {
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

pub(super) fn twins_batch(rows: &mut dyn Iterator<Item = &TwinRow>) -> RecordBatch {
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

pub(super) fn verdicts_batch(rows: &VecDeque<Verdict>) -> RecordBatch {
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
    let (mut rf, mut svm, mut lstm, mut twin, mut gbdt, mut label) =
        (Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), Float64Builder::new(), StringBuilder::new());
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
        gbdt.append_option(v.scores.as_ref().and_then(|s| s.gbdt));
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
            Arc::new(gbdt.finish()),
            Arc::new(label.finish()),
        ],
    )
}

pub(super) fn enum_str<T: serde::Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => String::new(),
    }
}

pub(super) fn alerts_batch(rows: &VecDeque<Alert>) -> RecordBatch {
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

pub(super) fn commands_batch(rows: &VecDeque<Command>) -> RecordBatch {
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

pub(super) fn status_batch(r: &StatusRow, now_ms: i64) -> RecordBatch {
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
