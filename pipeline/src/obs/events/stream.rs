//! Events of a micro-batch on its way through the stages and out: records in,
//! rejects, stage times, verdicts, responses, outputs acknowledged, offsets stored.

use super::*;

/// A micro-batch was decoded, applied to the twins and handed to the sink.
pub struct BatchProcessed {
    pub partition: i32,
    pub records: usize,
    pub valid: usize,
    pub verdicts: usize,
    pub anomalies: usize,
    pub skipped: u64,
}

impl BatchProcessed {
    pub fn emit(&self, m: &Metrics) {
        note("BatchProcessed");
        tracing::debug!(
            partition = self.partition,
            records = self.records,
            valid = self.valid,
            verdicts = self.verdicts,
            anomalies = self.anomalies,
            "batch processed"
        );
        m.batches.fetch_add(1, Relaxed);
        Instruments::get().batch_records.record(self.records as u64, &[]);
        m.records_in.fetch_add(self.records as u64, Relaxed);
        m.events_valid.fetch_add(self.valid as u64, Relaxed);
        m.verdicts_out.fetch_add(self.verdicts as u64, Relaxed);
        m.anomalies.fetch_add(self.anomalies as u64, Relaxed);
        m.replays_skipped.fetch_add(self.skipped, Relaxed);
        if self.skipped > 0 {
            tracing::info!(
                partition = self.partition,
                skipped = self.skipped,
                "records skipped: their twins had already applied them (a replay after a restart or handover; their verdicts exist)"
            );
        }
    }
}

/// A record was rejected by the decoder and sent to the dead-letter topic.
pub struct RecordRejected<'a> {
    pub partition: i32,
    pub offset: i64,
    pub code: RejectCode,
    pub reason: &'a str,
}

impl RecordRejected<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("RecordRejected");
        tracing::warn!(
            partition = self.partition,
            offset = self.offset,
            reason_code = self.code.as_str(),
            reason = self.reason,
            "record rejected to the dead-letter topic"
        );
        m.dlq_out.fetch_add(1, Relaxed);
        let i = RejectCode::ALL.iter().position(|c| *c == self.code).expect("every code is listed");
        m.dlq_by_reason[i].fetch_add(1, Relaxed);
    }
}

/// How long each stage took on one micro-batch (decode, detect, respond).
pub struct StageFinished {
    pub stage: &'static str,
    pub elapsed: std::time::Duration,
}

impl StageFinished {
    pub fn emit(&self) {
        note("StageFinished");
        Instruments::get().operator_latency.record(self.elapsed.as_secs_f64(), &[KeyValue::new("operator", self.stage)]);
    }
}

/// One batch's verdicts: counted by class, their scores by model.
pub struct VerdictsScored<'a> {
    pub verdicts: &'a [twinguard_schemas::verdict::Verdict],
}

impl VerdictsScored<'_> {
    /// Verdicts counted by class (attack class, else `anomaly` or `benign`), and
    /// every member's score recorded (the twin's alone without a model).
    pub fn emit(&self) {
        note("VerdictsScored");
        let ins = Instruments::get();
        let mut by_class: std::collections::HashMap<&str, u64> = std::collections::HashMap::new();
        for v in self.verdicts {
            let class = match (&v.attack_class, v.anomalous) {
                (Some(c), _) => c.as_str(),
                (None, true) => "anomaly",
                (None, false) => "benign",
            };
            *by_class.entry(class).or_default() += 1;
            match &v.scores {
                Some(sc) => {
                    for (model, x) in [("ensemble", Some(sc.ensemble)), ("rf", Some(sc.rf)), ("svm", Some(sc.svm)), ("lstm", Some(sc.lstm)), ("twin", Some(sc.twin)), ("gbdt", sc.gbdt)] {
                        let Some(x) = x else { continue };
                        ins.score.record(x, &[KeyValue::new("model", model)]);
                    }
                }
                None => ins.score.record(v.score, &[KeyValue::new("model", "twin")]),
            }
        }
        for (class, n) in by_class {
            ins.verdicts.add(n, &[KeyValue::new("class", class.to_string())]);
        }
    }
}

/// Offsets were stored after every output derived from them was acknowledged.
pub struct OffsetsStored {
    pub partition: i32,
    pub next_offset: i64,
}

impl OffsetsStored {
    pub fn emit(&self, m: &Metrics) {
        note("OffsetsStored");
        tracing::trace!(partition = self.partition, next_offset = self.next_offset, "offsets stored");
        m.offsets_stored.fetch_add(1, Relaxed);
    }
}

/// Records arrived below the offset expected next on their partition: the consumer
/// went back (an offset reset or a seek). Their events are applied again only where
/// their twins had not seen them (the replay guard skips the rest, counted).
pub struct OffsetsRewound<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub expected: i64,
    pub offset: i64,
}

impl OffsetsRewound<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("OffsetsRewound");
        tracing::warn!(topic = self.topic, partition = self.partition, expected = self.expected, offset = self.offset, "offsets went back on a partition (offset reset or seek)");
        m.offsets_rewound.fetch_add(1, Relaxed);
    }
}

/// A newly assigned input partition's first record lies past the committed offset
/// it resumed at: the offsets between were never delivered to this pipeline. Kafka
/// does that when retention deleted records (the consumer fell behind) or compaction
/// removed them, and, harmlessly, for transactional producers: a commit marker or an
/// aborted transaction's records occupy offsets a `read_committed` consumer never
/// sees. tansu 0.6 does it when the committed offset is inside a stored batch (it
/// serves such a fetch from the next batch).
pub struct InputGap {
    pub partition: i32,
    pub resumed_at: i64,
    pub first_offset: i64,
}

impl InputGap {
    pub fn emit(&self, m: &Metrics) {
        note("InputGap");
        let skipped = (self.first_offset - self.resumed_at).max(0) as u64;
        tracing::warn!(
            partition = self.partition,
            resumed_at = self.resumed_at,
            first_offset = self.first_offset,
            skipped,
            "input records skipped: the partition's next record lies past the offset expected (its committed offset after a restart or handover, or the previous record's successor mid-stream): retention, compaction or a broker fault, and those events get no verdict; or, with transactional producers, commit markers and aborted records, which are not events"
        );
        m.input_gap_records.fetch_add(skipped, Relaxed);
    }
}

/// A batch's outputs were acknowledged by the broker; `latency`: from the oldest
/// event's own timestamp to now (end-to-end).
pub struct OutputsAcknowledged {
    pub latency: std::time::Duration,
}

impl OutputsAcknowledged {
    pub fn emit(&self) {
        note("OutputsAcknowledged");
        Instruments::get().e2e_latency.record(self.latency.as_secs_f64(), &[]);
    }
}

/// Changelog records (changed or removed twins) were handed to the producer.
pub struct ChangelogWritten {
    pub records: usize,
}

impl ChangelogWritten {
    pub fn emit(&self, m: &Metrics) {
        note("ChangelogWritten");
        m.changelog_out.fetch_add(self.records as u64, Relaxed);
    }
}

/// The twins held now (after a batch, or as the fleet reader counts them).
pub struct TwinsCounted {
    pub twins: usize,
}

impl TwinsCounted {
    pub fn emit(&self, m: &Metrics) {
        note("TwinsCounted");
        m.set_twins(self.twins, None);
    }
}

/// State gauges refreshed after each batch.
pub struct StateSampled {
    pub twins: usize,
    pub mem_bytes: usize,
    pub expired: usize,
}

impl StateSampled {
    /// Also the pipeline's periodic status line (every `batch.expiry_interval_secs`).
    pub fn emit(&self, m: &Metrics) {
        note("StateSampled");
        let g = m.gate.lock().expect("gate status lock").clone();
        tracing::info!(
            gate_suspended = g.suspended,
            live_precision = ?g.acting.precision,
            live_detection_rate = ?g.acting.detection_rate,
            live_fpr = ?g.acting.fpr,
            response_ms_quantile = ?g.response_ms,
            feedback_labels = g.labels,
            alerts = m.alerts_out.load(Relaxed),
            commands = m.commands_out.load(Relaxed),
            records_in = m.records_in.load(Relaxed),
            verdicts = m.verdicts_out.load(Relaxed),
            anomalies = m.anomalies.load(Relaxed),
            dead_letters = m.dlq_out.load(Relaxed),
            twins = self.twins,
            twin_mem_bytes = self.mem_bytes,
            expired = self.expired,
            partitions = m.partitions_owned(),
            "status"
        );
        m.set_twins(self.twins, Some(self.mem_bytes));
        m.twins_expired.fetch_add(self.expired as u64, Relaxed);
    }
}

/// An idle sweep found more idle twins than `state.max_expiries_per_sweep`.
pub struct ExpiryCapped {
    pub expired: usize,
    pub left: usize,
}

impl ExpiryCapped {
    pub fn emit(&self, m: &Metrics) {
        note("ExpiryCapped");
        tracing::warn!(expired = self.expired, left = self.left, "idle sweep capped: more idle twins than state.max_expiries_per_sweep; the rest go at the next sweeps");
        m.expiry_capped.fetch_add(self.left as u64, Relaxed);
    }
}

/// Twins reset at an event after a long silence, and twins that shed learned
/// strings to fit `state.max_twin_bytes` (running totals of the twin operator).
pub struct TwinResetsCounted {
    pub resets: u64,
    pub shed: u64,
}

impl TwinResetsCounted {
    pub fn emit(&self, m: &Metrics) {
        note("TwinResetsCounted");
        m.twin_resets.store(self.resets, Relaxed);
        m.twins_shed.store(self.shed, Relaxed);
    }
}

/// An alert was raised.
pub struct AlertRaised<'a> {
    pub alert: &'a Alert,
}

impl AlertRaised<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("AlertRaised");
        let a = self.alert;
        tracing::info!(
            device_id = %a.device_id,
            alert_id = %a.alert_id,
            kind = ?a.kind,
            class = a.attack_class.as_deref().unwrap_or("-"),
            score = a.score,
            action = a.response.action.as_str(),
            automated = a.response.automated,
            needs_human = a.response.needs_human,
            "alert"
        );
        m.alerts_out.fetch_add(1, Relaxed);
        Instruments::get().alerts.add(1, &[KeyValue::new("class", match (&a.attack_class, a.kind) {
            (_, twinguard_schemas::respond::AlertKind::CommandUnacknowledged) => "command_unacknowledged".to_string(),
            (Some(c), _) => c.clone(),
            (None, _) => "anomaly".to_string(),
        })]);
    }
}

/// A response command was issued.
pub struct CommandIssued<'a> {
    pub command: &'a Command,
}

impl CommandIssued<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("CommandIssued");
        let c = self.command;
        tracing::info!(device_id = %c.device_id, command_id = %c.command_id, action = c.action.as_str(), rule = %c.reason.rule, "command issued");
        m.commands_out.fetch_add(1, Relaxed);
        Instruments::get().commands.add(1, &[KeyValue::new("action", c.action.as_str())]);
    }
}

/// An audit record was queued for its chain's partition.
pub struct AuditWritten {
    pub chain: i32,
}

impl AuditWritten {
    pub fn emit(&self, m: &Metrics) {
        note("AuditWritten");
        tracing::trace!(chain = self.chain, "audit record");
        m.audit_out.fetch_add(1, Relaxed);
    }
}

/// An audit record was not written: its partition's chain was never continued from
/// the topic's tail (appending would fork it). Never expected; logged as an error.
pub struct AuditUnchained {
    pub partition: i32,
    pub kind: twinguard_schemas::respond::AuditKind,
}

impl AuditUnchained {
    pub fn emit(&self, m: &Metrics) {
        note("AuditUnchained");
        tracing::error!(partition = self.partition, kind = ?self.kind, "audit record NOT written: the partition's audit chain has no head (its tail was never read)");
        m.audit_unchained.fetch_add(1, Relaxed);
    }
}

/// A command's response time: its triggering event appended -> the command
/// acknowledged by the broker; with when the pipeline consumed the event (all
/// epoch ms; `consumed_ms` from this process's monotonic clock, to a millisecond).
pub struct ResponseTimeObserved {
    pub event_ms: i64,
    pub consumed_ms: i64,
    pub acked_ms: i64,
}

impl ResponseTimeObserved {
    /// The response time in ms (what the histogram and the gate's bound take).
    pub fn millis(&self) -> f64 {
        (self.acked_ms - self.event_ms).max(0) as f64
    }

    pub fn emit(&self, m: &Metrics) {
        note("ResponseTimeObserved");
        let millis = self.millis();
        // Per command, for finding where a slow one waited (RUST_LOG=…=debug): before
        // the pipeline read the event (producer, broker, fetch) or after.
        let (before, after) = (self.consumed_ms - self.event_ms, (self.acked_ms - self.consumed_ms).max(0));
        tracing::debug!(event_ms = self.event_ms, acked_ms = self.acked_ms, millis, before_consumed_ms = before, consumed_to_acked_ms = after, "command response time");
        crate::obs::Instruments::get().response_in_pipeline.record(after as f64 / 1000.0, &[]);
        m.record_response_ms(millis);
    }
}
