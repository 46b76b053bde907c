//! Internal events: each event struct both logs (tracing) and counts ([`Metrics`],
//! [`Instruments`]); no metric names are scattered through the code.

use std::sync::atomic::Ordering::Relaxed;

use opentelemetry::KeyValue;

use crate::obs::{Instruments, Metrics};

use twinguard_operators::Transition;
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::RejectCode;

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

/// A SQL login was refused: a wrong password or an unknown user (`throttled` false:
/// the password was checked, `failures` from this address so far, and the back-off
/// that failure started), or a login from an address still backed off (`throttled`
/// true: refused unchecked, `backoff` left).
pub struct SqlLoginFailed<'a> {
    pub peer: std::net::IpAddr,
    pub user: &'a str,
    pub throttled: bool,
    pub failures: u32,
    pub backoff: Option<std::time::Duration>,
}

impl SqlLoginFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("SqlLoginFailed");
        // A client chooses the name: at most 64 characters of it in the log.
        let user: String = self.user.chars().take(64).collect();
        let backoff_ms = self.backoff.map(|b| b.as_millis() as u64);
        if self.throttled {
            tracing::warn!(peer = %self.peer, user = %user, backoff_left_ms = ?backoff_ms, "SQL login refused: too many failed logins from this address");
            m.sql_throttled_logins.fetch_add(1, Relaxed);
        } else {
            tracing::warn!(peer = %self.peer, user = %user, failures = self.failures, backoff_ms = ?backoff_ms, "SQL login failed (wrong password or unknown user)");
            m.sql_failed_logins.fetch_add(1, Relaxed);
        }
    }
}

/// A refresh of the SQL view failed (a panic while building its tables): the last
/// snapshot stays published and the next refresh tries again.
pub struct SqlRefreshFailed<'a> {
    pub error: &'a str,
}

impl SqlRefreshFailed<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("SqlRefreshFailed");
        tracing::error!(error = self.error, "SQL view refresh failed: queries see the previous snapshot until a refresh succeeds");
        m.sql_refresh_failures.fetch_add(1, Relaxed);
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

/// A device acknowledged a command.
pub struct AckApplied<'a> {
    pub device: &'a str,
    pub command: &'a str,
    /// False when the command was no longer pending (a duplicate or late ack).
    pub reconciled: bool,
}

impl AckApplied<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("AckApplied");
        tracing::info!(device_id = self.device, command_id = self.command, reconciled = self.reconciled, "command acknowledged");
        m.acks_applied.fetch_add(1, Relaxed);
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

/// A record of a control topic (acks, feedback) was rejected to the DLQ.
pub struct ControlRejected<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub reason: &'a str,
}

impl ControlRejected<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("ControlRejected");
        tracing::warn!(topic = self.topic, partition = self.partition, offset = self.offset, reason = self.reason, "control record rejected to the dead-letter topic");
        m.control_rejected.fetch_add(1, Relaxed);
        m.dlq_out.fetch_add(1, Relaxed);
    }
}

/// Confidence gating suspended or resumed automated actions.
pub struct GateChanged<'a> {
    pub transition: &'a Transition,
}

impl GateChanged<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("GateChanged");
        match self.transition {
            Transition::Suspended(s) => {
                tracing::warn!(reasons = ?s.reasons, labels = s.labels, "automated responses SUSPENDED by confidence gating");
                m.gate_suspended.store(1, Relaxed);
            }
            Transition::Resumed(s) => {
                tracing::info!(labels = s.labels, precision = ?s.acting.precision, fpr = ?s.acting.fpr, "automated responses resumed");
                m.gate_suspended.store(0, Relaxed);
            }
        }
    }
}

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

/// Records of a control topic (acks) were never delivered: a record arrived past the
/// offset expected next on its partition (retention or compaction outran the
/// consumer, or a broker fault). Those acknowledgements were not applied.
pub struct ControlGap<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub expected: i64,
    pub offset: i64,
}

impl ControlGap<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("ControlGap");
        let skipped = (self.offset - self.expected).max(0) as u64;
        tracing::warn!(topic = self.topic, partition = self.partition, expected = self.expected, offset = self.offset, skipped, "control records skipped: the partition's next record lies past the offset expected");
        m.control_gap_records.fetch_add(skipped, Relaxed);
    }
}

/// Restored twins claim events their input partition does not have: their last
/// applied offset is at or past the partition's end. The input topic was recreated
/// or truncated while the changelog survived: the replay guard would skip every
/// new event of these devices up to that offset (each skip is counted and logged).
pub struct TwinsAheadOfInput {
    pub partition: i32,
    pub high_watermark: i64,
    pub twins: usize,
    pub max_last_offset: i64,
}

impl TwinsAheadOfInput {
    pub fn emit(&self, m: &Metrics) {
        note("TwinsAheadOfInput");
        tracing::error!(
            partition = self.partition,
            high_watermark = self.high_watermark,
            twins = self.twins,
            max_last_offset = self.max_last_offset,
            "restored twins are ahead of their input partition (was the input topic recreated? then delete the changelog topic or start a new consumer group with a new changelog): events at or below their last offsets would be skipped"
        );
        m.twins_ahead_of_input.fetch_add(self.twins as u64, Relaxed);
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

/// A changelog record could not be restored (it does not decode, or it is larger
/// than `state.max_twin_bytes`): it was set aside (dead-lettered by a pipeline
/// instance; only counted by `twinguard sql`) and its device starts a fresh twin.
pub struct ChangelogQuarantined<'a> {
    pub partition: i32,
    pub offset: i64,
    pub key: &'a str,
    pub reason: &'a str,
}

impl ChangelogQuarantined<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("ChangelogQuarantined");
        tracing::error!(
            partition = self.partition,
            offset = self.offset,
            key = %twinguard_schemas::dlq::clip(self.key, 128),
            reason = %twinguard_schemas::dlq::bound_reason(self.reason),
            "changelog record quarantined: its twin is not restored (the device starts over)"
        );
        m.changelog_quarantined.fetch_add(1, Relaxed);
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

/// Twins of a partition were restored from the changelog.
pub struct TwinsRestored {
    pub partition: i32,
    pub twins: usize,
    pub records_read: u64,
    pub millis: u128,
}

impl TwinsRestored {
    pub fn emit(&self, m: &Metrics) {
        note("TwinsRestored");
        tracing::info!(
            partition = self.partition,
            twins = self.twins,
            records_read = self.records_read,
            millis = self.millis as u64,
            "twins restored from changelog"
        );
        m.twins_restored.fetch_add(self.twins as u64, Relaxed);
        m.changelog_in.fetch_add(self.records_read, Relaxed);
    }
}

/// The consumer group moved partitions.
pub struct Rebalanced<'a> {
    pub kind: &'a str,
    pub partitions: &'a [i32],
}

impl Rebalanced<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("Rebalanced");
        tracing::info!(kind = self.kind, partitions = ?self.partitions, "rebalance");
        m.rebalances.fetch_add(1, Relaxed);
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
        m.twins.store(self.twins as i64, Relaxed);
        m.twin_mem_bytes.store(self.mem_bytes as i64, Relaxed);
        m.twins_expired.fetch_add(self.expired as u64, Relaxed);
    }
}

/// The model's decision threshold was moved to `model.target_fpr` at start.
pub struct ThresholdRecalibrated<'a> {
    pub model: &'a str,
    pub target_fpr: f64,
    pub threshold: f64,
}

impl ThresholdRecalibrated<'_> {
    pub fn emit(&self) {
        note("ThresholdRecalibrated");
        tracing::info!(model = %self.model, target_fpr = self.target_fpr, threshold = self.threshold, "decision threshold recalibrated");
    }
}

/// The engine or the fleet reader made progress (liveness for `/healthz`: a long
/// restore or a quiet stream is not a stall).
pub struct Heartbeat;

impl Heartbeat {
    pub fn emit(&self, m: &Metrics) {
        note("Heartbeat");
        m.heartbeat_ms.store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }
}

/// The control consumer (acks, feedback) made progress.
pub struct ControlHeartbeat;

impl ControlHeartbeat {
    pub fn emit(&self, m: &Metrics) {
        note("ControlHeartbeat");
        m.control_beat_ms.store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }
}

/// How long a heartbeat may be missed before `/healthz` reports a stall.
pub struct StallLimitSet {
    pub millis: i64,
}

impl StallLimitSet {
    pub fn emit(&self, m: &Metrics) {
        note("StallLimitSet");
        m.stall_limit_ms.store(self.millis, Relaxed);
    }
}

/// The SQL view's refresh bound (`/healthz` reports a view that stopped refreshing).
pub struct RefreshLimitSet {
    pub millis: i64,
}

impl RefreshLimitSet {
    pub fn emit(&self, m: &Metrics) {
        note("RefreshLimitSet");
        m.sql_refresh_limit_ms.store(self.millis, Relaxed);
    }
}

/// The twins held now (after a batch, or as the fleet reader counts them).
pub struct TwinsCounted {
    pub twins: usize,
}

impl TwinsCounted {
    pub fn emit(&self, m: &Metrics) {
        note("TwinsCounted");
        m.twins.store(self.twins as i64, Relaxed);
    }
}

/// Partitions were assigned and their twins restored: the instance is ready.
pub struct PartitionsReady<'a> {
    pub owned: &'a [i32],
    pub twins: usize,
}

impl PartitionsReady<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("PartitionsReady");
        m.set_owned(self.owned.to_vec());
        m.twins.store(self.twins as i64, Relaxed);
        m.ready.store(1, Relaxed);
    }
}

/// Partitions were revoked or lost: not ready until the next assignment is restored.
pub struct PartitionsReleased<'a> {
    pub owned: &'a [i32],
}

impl PartitionsReleased<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("PartitionsReleased");
        m.set_owned(self.owned.to_vec());
        m.ready.store(0, Relaxed);
    }
}

/// This member's assignment was lost; it rejoins the group as a new member.
pub struct GroupRejoining<'a> {
    pub reason: &'a str,
}

impl GroupRejoining<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("GroupRejoining");
        let n = m.rejoins.fetch_add(1, Relaxed) + 1;
        tracing::warn!(reason = %self.reason, rejoins = n, "assignment lost: rejoining the group as a new member");
        // Healthy again (the old run wrote nothing after the loss); ready once the
        // new assignment is restored.
        m.failed.lock().expect("failed lock").take();
        m.ready.store(0, Relaxed);
    }
}

/// librdkafka's consumer lag of the owned input partitions (from its statistics).
pub struct LagSampled {
    pub lag: std::collections::BTreeMap<i32, i64>,
}

impl LagSampled {
    pub fn emit(self, m: &Metrics) {
        note("LagSampled");
        m.set_lag(self.lag);
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
    pub by_class: &'a [(&'a str, u64)],
    /// (model, score) pairs, one per member per verdict.
    pub scores: &'a [(&'static str, f64)],
}

impl VerdictsScored<'_> {
    pub fn emit(&self) {
        note("VerdictsScored");
        let ins = Instruments::get();
        for (model, x) in self.scores {
            ins.score.record(*x, &[KeyValue::new("model", *model)]);
        }
        for (class, n) in self.by_class {
            ins.verdicts.add(*n, &[KeyValue::new("class", class.to_string())]);
        }
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

/// A command's response time: its triggering event appended -> the command sent.
pub struct ResponseTimeObserved {
    pub millis: f64,
}

impl ResponseTimeObserved {
    pub fn emit(&self, m: &Metrics) {
        note("ResponseTimeObserved");
        m.record_response_ms(self.millis);
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

/// Changelog records were read (the fleet reader, one at a time).
pub struct ChangelogRead {
    pub records: u64,
}

impl ChangelogRead {
    pub fn emit(&self, m: &Metrics) {
        note("ChangelogRead");
        m.changelog_in.fetch_add(self.records, Relaxed);
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

/// Quarantined changelog records' dead letters were acknowledged (before the
/// partition is served).
pub struct QuarantineDeadLettered {
    pub records: usize,
}

impl QuarantineDeadLettered {
    pub fn emit(&self, m: &Metrics) {
        note("QuarantineDeadLettered");
        tracing::info!(records = self.records, "dead letters of quarantined changelog records acknowledged");
        m.dlq_out.fetch_add(self.records as u64, Relaxed);
    }
}

/// A record was read from a control topic (acks or feedback).
pub struct ControlRecordRead {
    /// `true` for the acks topic, `false` for feedback.
    pub ack: bool,
}

impl ControlRecordRead {
    pub fn emit(&self, m: &Metrics) {
        note("ControlRecordRead");
        if self.ack { &m.acks_in } else { &m.feedback_in }.fetch_add(1, Relaxed);
    }
}

/// The confidence gate's status, sampled at a tick (for the status line, the SQL
/// `status` row and the gauges).
pub struct GateSampled {
    pub status: twinguard_operators::GateStatus,
}

impl GateSampled {
    pub fn emit(self, m: &Metrics) {
        note("GateSampled");
        *m.gate.lock().expect("gate status lock") = self.status;
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

/// The fleet reader (`twinguard sql`) skipped a record it cannot read (a changelog
/// twin, or a verdict, alert or command of the recent windows). Nothing is
/// dead-lettered: the record stays where it is (a pipeline's restore quarantines
/// an unreadable twin).
pub struct FleetRecordSkipped<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub what: &'a str,
    pub error: &'a str,
}

impl FleetRecordSkipped<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("FleetRecordSkipped");
        tracing::warn!(topic = self.topic, partition = self.partition, offset = self.offset, error = self.error, "skipping a record that is not a {}", self.what);
        m.fleet_records_skipped.fetch_add(1, Relaxed);
    }
}

/// The SQL view published a snapshot; `age`: how old its newest staged change was.
pub struct SqlSnapshotPublished {
    pub age: std::time::Duration,
}

impl SqlSnapshotPublished {
    pub fn emit(&self) {
        note("SqlSnapshotPublished");
        Instruments::get().sql_freshness.record(self.age.as_secs_f64(), &[]);
    }
}

/// Test support: which events were emitted in this process (unit tests only;
/// release code pays nothing). Vector's `assert_transform_compliance`, in small.
#[cfg(test)]
pub mod testing {
    use std::collections::BTreeSet;
    use std::sync::Mutex;

    pub(super) static EMITTED: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());

    /// The names of the events emitted so far by any test in this process.
    pub fn emitted() -> BTreeSet<&'static str> {
        EMITTED.lock().expect("events lock").clone()
    }

    /// Fails naming the events of `names` that were never emitted.
    pub fn assert_emitted(names: &[&str]) {
        let seen = emitted();
        let missing: Vec<&str> = names.iter().copied().filter(|n| !seen.contains(n)).collect();
        assert!(missing.is_empty(), "events never emitted: {missing:?} (emitted: {seen:?})");
    }
}

/// Records that the event `name` was emitted (for [`testing`]; nothing outside tests).
#[inline]
fn note(_name: &'static str) {
    #[cfg(test)]
    testing::EMITTED.lock().expect("events lock").insert(_name);
}

/// What the pipeline runs with, known before it waits for the brokers (the SQL
/// `status` row and `/metrics` carry it).
pub struct PipelineConfigured<'a> {
    pub schema: &'a str,
    pub model: Option<&'a str>,
    /// No response rules: every alert is `notify`.
    pub no_rules: bool,
    /// No audit signing key: decisions are not chained.
    pub no_audit: bool,
}

impl PipelineConfigured<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("PipelineConfigured");
        if self.no_rules {
            tracing::warn!("no response rules: every alert is `notify`");
        }
        if self.no_audit {
            tracing::warn!("audit trail disabled: set `audit.signing_key_file` (twinguard audit keygen) to sign and chain every decision");
        }
        *m.model_version.lock().expect("info lock") = self.model.map(str::to_string);
        *m.schema_id.lock().expect("info lock") = self.schema.to_string();
    }
}

/// The pipeline starts consuming (the brokers answered, the topics exist).
pub struct PipelineStarted<'a> {
    pub input: &'a str,
    pub partitions: usize,
    pub schema: &'a str,
    pub model: Option<&'a str>,
}

impl PipelineStarted<'_> {
    pub fn emit(&self) {
        note("PipelineStarted");
        tracing::info!(input = %self.input, partitions = self.partitions, schema = %self.schema, model = self.model.unwrap_or("none (twin behaviour only)"), "starting pipeline");
    }
}

/// `twinguard sql` starts reading every twin from the changelog.
pub struct FleetReading<'a> {
    pub changelog: &'a str,
    pub partitions: &'a [i32],
    pub schema: &'a str,
    pub stall_limit_ms: i64,
}

impl FleetReading<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("FleetReading");
        tracing::info!(changelog = %self.changelog, partitions = self.partitions.len(), "materialising every twin from the changelog");
        *m.schema_id.lock().expect("info lock") = self.schema.to_string();
        m.set_owned(self.partitions.to_vec());
        m.stall_limit_ms.store(self.stall_limit_ms, Relaxed);
    }
}

/// `twinguard sql` shows every twin the changelog held at its start: ready.
pub struct FleetReady {
    pub twins: usize,
    /// Time from the start of the read; `None` when the changelog was empty.
    pub millis: Option<u64>,
    pub view_rows: u64,
    pub view_bytes: u64,
}

impl FleetReady {
    pub fn emit(&self, m: &Metrics) {
        note("FleetReady");
        tracing::info!(twins = self.twins, millis = self.millis, view_rows = self.view_rows, view_bytes = self.view_bytes, "every twin materialised; ready");
        m.ready.store(1, Relaxed);
    }
}

/// The SQL view's refresher turned (a heartbeat: `/healthz` fails if it stops).
pub struct SqlViewTurned;

impl SqlViewTurned {
    pub fn emit(&self, m: &Metrics) {
        note("SqlViewTurned");
        m.sql_refresh_beat_ms.store(chrono::Utc::now().timestamp_millis(), Relaxed);
    }
}

/// A twin change the stream encoded itself did not decode for the SQL view (a bug:
/// the twin is left out of the view; the stream is unaffected).
pub struct TwinRowUndecodable<'a> {
    pub device: &'a str,
    pub error: &'a str,
}

impl TwinRowUndecodable<'_> {
    pub fn emit(&self) {
        note("TwinRowUndecodable");
        tracing::error!(device = self.device, error = self.error, "twin change not shown in SQL: it does not decode");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    #[should_panic(expected = "events never emitted: [\"NoSuchEvent\"]")]
    fn assert_emitted_names_what_was_never_emitted() {
        super::Heartbeat.emit(&super::Metrics::default());
        super::testing::assert_emitted(&["Heartbeat", "NoSuchEvent"]);
    }
}
