//! Events of an instance's life: start, liveness, rebalances, restore and
//! quarantine, rejoining the group.

use super::*;

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

/// The instance starts its stream workers (`engine.workers` > 1).
pub struct WorkersStarting {
    pub workers: usize,
}

impl WorkersStarting {
    pub fn emit(&self) {
        note("WorkersStarting");
        tracing::info!(workers = self.workers, "starting stream workers: each joins the group and owns its own partitions");
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

/// A federation's model scores at this site's own threshold (`model.site`), or
/// at the federation's where the site is too small to set one.
pub struct SiteThresholdChosen<'a> {
    pub model: &'a str,
    pub site: &'a str,
    pub chosen: &'a str,
}

impl SiteThresholdChosen<'_> {
    pub fn emit(&self) {
        note("SiteThresholdChosen");
        tracing::info!(model = %self.model, site = %self.site, chosen = %self.chosen, "decision threshold of this site");
    }
}

/// The engine or the fleet reader made progress (liveness for `/healthz`: a long
/// restore or a quiet stream is not a stall).
pub struct Heartbeat;

impl Heartbeat {
    pub fn emit(&self, m: &Metrics) {
        note("Heartbeat");
        m.beat();
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

/// Partitions were assigned and their twins restored: the instance is ready.
pub struct PartitionsReady {
    pub owned: Vec<i32>,
    pub twins: usize,
}

impl PartitionsReady {
    pub fn emit(self, m: &Metrics) {
        note("PartitionsReady");
        tracing::info!(owned = ?self.owned, twins = self.twins, "partitions ready");
        m.set_owned(self.owned);
        m.set_twins(self.twins, None);
        m.set_ready(true);
    }
}

/// Partitions were revoked or lost: not ready until the next assignment is restored.
pub struct PartitionsReleased {
    pub owned: Vec<i32>,
}

impl PartitionsReleased {
    pub fn emit(self, m: &Metrics) {
        note("PartitionsReleased");
        m.set_owned(self.owned);
        m.set_ready(false);
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
        m.set_ready(false);
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

/// The pipeline hit an error it must not go past: it stops (no offset is stored
/// past it) and `/healthz` reports the first such reason.
pub struct PipelineFailing<'a> {
    pub reason: &'a str,
}

impl PipelineFailing<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("PipelineFailing");
        tracing::error!(error = %self.reason, "pipeline failing");
        m.failed.lock().expect("failed lock").get_or_insert_with(|| self.reason.to_string());
    }
}

/// Analyst feedback read at start had already suspended automated responses.
pub struct StartsSuspended;

impl StartsSuspended {
    pub fn emit(&self) {
        note("StartsSuspended");
        tracing::warn!("starting with automated responses SUSPENDED (analyst feedback before this start)");
    }
}

/// Leaving the consumer group at the end of a run (final commit, unsubscribe,
/// close) did not finish within `engine.close_timeout_secs`; the worker went on
/// without it.
pub struct CloseTimedOut {
    pub step: &'static str,
    pub secs: u64,
}

impl CloseTimedOut {
    pub fn emit(&self) {
        note("CloseTimedOut");
        tracing::warn!(
            step = self.step,
            after_secs = self.secs,
            "leaving the consumer group did not finish in time; stopping without it (outputs and offsets were stored before; the group notices this member gone after session.timeout.ms)"
        );
    }
}

/// SIGINT or SIGTERM: the process stops after its in-flight batches.
pub struct StopRequested {
    pub signal: &'static str,
}

impl StopRequested {
    pub fn emit(&self) {
        note("StopRequested");
        tracing::info!("{}: stopping after in-flight batches", self.signal);
    }
}

/// The pipeline stopped cleanly (outputs acknowledged, offsets committed).
pub struct StoppedCleanly {
    pub twins: usize,
    pub twin_mem_bytes: usize,
}

impl StoppedCleanly {
    pub fn emit(&self) {
        note("StoppedCleanly");
        tracing::info!(twins = self.twins, twin_mem_bytes = self.twin_mem_bytes, "stopped cleanly");
    }
}

/// A partition switched model version (`model.follow`): the activation record is
/// durable on the changelog (and in the partition's audit chain) before any event
/// is scored with it.
pub struct ModelActivated<'a> {
    pub partition: i32,
    pub version: &'a str,
    pub first_offset: i64,
    pub replaced: Option<&'a str>,
}

impl ModelActivated<'_> {
    pub fn emit(&self, m: &Metrics) {
        note("ModelActivated");
        *m.model_version.lock().expect("info lock") = Some(self.version.to_string());
        tracing::info!(partition = self.partition, version = %self.version, first_offset = self.first_offset, replaced = self.replaced.unwrap_or("none"), "model activated");
    }
}

/// A published model version was refused (it does not fit this pipeline, or its
/// message did not verify); the partitions keep the version they run.
pub struct ModelRefused<'a> {
    pub version: &'a str,
    pub reason: &'a str,
}

impl ModelRefused<'_> {
    pub fn emit(&self) {
        note("ModelRefused");
        tracing::error!(version = %self.version, reason = %self.reason, "published model refused");
    }
}
