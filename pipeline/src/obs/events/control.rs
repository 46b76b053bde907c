//! Events of the control topics: acks, feedback, the confidence gate.

use super::*;

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
