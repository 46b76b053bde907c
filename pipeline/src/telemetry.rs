//! Internal telemetry through typed events: each event struct both logs (tracing)
//! and counts ([`Metrics`]); no metric names are scattered through the code.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use twinguard_schemas::RejectCode;

/// Counters and gauges of one pipeline instance. Cheap to read at any time.
#[derive(Debug, Default)]
pub struct Metrics {
    pub records_in: AtomicU64,
    pub events_valid: AtomicU64,
    pub verdicts_out: AtomicU64,
    pub anomalies: AtomicU64,
    pub dlq_out: AtomicU64,
    dlq_by_reason: [AtomicU64; RejectCode::ALL.len()],
    pub replays_skipped: AtomicU64,
    pub batches: AtomicU64,
    pub changelog_out: AtomicU64,
    pub offsets_stored: AtomicU64,
    pub twins: AtomicI64,
    pub twin_mem_bytes: AtomicI64,
    pub twins_restored: AtomicU64,
    pub twins_expired: AtomicU64,
    pub rebalances: AtomicU64,
    pub partitions_owned: AtomicI64,
    /// 1 once partitions are assigned and their twins restored.
    pub ready: AtomicI64,
}

impl Metrics {
    pub fn dlq_by_reason(&self) -> Vec<(RejectCode, u64)> {
        RejectCode::ALL.iter().zip(&self.dlq_by_reason).map(|(c, n)| (*c, n.load(Relaxed))).filter(|(_, n)| *n > 0).collect()
    }
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
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
        tracing::debug!(
            partition = self.partition,
            records = self.records,
            valid = self.valid,
            verdicts = self.verdicts,
            anomalies = self.anomalies,
            "batch processed"
        );
        m.batches.fetch_add(1, Relaxed);
        m.records_in.fetch_add(self.records as u64, Relaxed);
        m.events_valid.fetch_add(self.valid as u64, Relaxed);
        m.verdicts_out.fetch_add(self.verdicts as u64, Relaxed);
        m.anomalies.fetch_add(self.anomalies as u64, Relaxed);
        m.replays_skipped.fetch_add(self.skipped, Relaxed);
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
        tracing::info!(
            partition = self.partition,
            twins = self.twins,
            records_read = self.records_read,
            millis = self.millis as u64,
            "twins restored from changelog"
        );
        m.twins_restored.fetch_add(self.twins as u64, Relaxed);
    }
}

/// The consumer group moved partitions.
pub struct Rebalanced<'a> {
    pub kind: &'a str,
    pub partitions: &'a [i32],
}

impl Rebalanced<'_> {
    pub fn emit(&self, m: &Metrics) {
        tracing::info!(kind = self.kind, partitions = ?self.partitions, "rebalance");
        m.rebalances.fetch_add(1, Relaxed);
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
        tracing::info!(
            records_in = m.records_in.load(Relaxed),
            verdicts = m.verdicts_out.load(Relaxed),
            anomalies = m.anomalies.load(Relaxed),
            dead_letters = m.dlq_out.load(Relaxed),
            twins = self.twins,
            twin_mem_bytes = self.mem_bytes,
            expired = self.expired,
            partitions = m.partitions_owned.load(Relaxed),
            "status"
        );
        m.twins.store(self.twins as i64, Relaxed);
        m.twin_mem_bytes.store(self.mem_bytes as i64, Relaxed);
        m.twins_expired.fetch_add(self.expired as u64, Relaxed);
    }
}
