//! The streaming spine: source → decode → twin update → verdicts/DLQ → sink, with
//! offsets stored only after every output derived from them is acknowledged.
//!
//! Threads (all owned and joined; no detached work):
//! - the **core** thread (the caller of [`run`]): polls the consumer (rebalance
//!   callbacks run here too), closes per-partition micro-batches by size or linger
//!   time, decodes, applies them to the twins and hands verdicts and dead letters to
//!   the producer;
//! - the **changelog** thread: waits for a batch's verdicts and dead letters to be
//!   acknowledged, then produces the twins it changed to the changelog;
//! - the **offsets** thread: waits for that changelog write to be acknowledged,
//!   then stores the batch's offsets (committed in the background).
//!
//! The two hand-offs are bounded channels of `batch.max_inflight_batches`: when the
//! broker is slow, the core blocks and stops polling (backpressure).
//!
//! Why this order: a verdict is acknowledged before the twin state that includes its
//! event, and that state before the offset. After a crash, a record whose twin
//! state was saved is skipped (its verdict exists); a record whose state was not is
//! re-applied to the same earlier state and yields a byte-identical verdict.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::{ClientContext, Message, TopicPartitionList};
use twinguard_operators::respond::AckOutcome;
use twinguard_operators::{ChangelogRecord, Detector, Gate, Responder, Responses, Twin};
use twinguard_schemas::respond::{Ack, Alert, Feedback, RESPONSE_VERSION};
use twinguard_schemas::verdict::{verdicts_from_batch, Verdict};
use twinguard_schemas::dlq::{bound_reason, parse_control, DeadLetter, Source};
use twinguard_schemas::{Decoder, RawRecord};


use crate::config::Config;
use crate::kafka::{self, AckGroup, OutRecord, SinkProducer};
use crate::obs::events as ev;
use crate::obs::Metrics;
use crate::PipelineError;


/// Owned copy of a consumed record.
struct Rec {
    offset: i64,
    /// The record's timestamp (producer create time or broker append time).
    ts: Option<i64>,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    /// When this process consumed it (SQL freshness).
    consumed: Instant,
}

struct PartBuf {
    records: Vec<Rec>,
    opened: Instant,
}

/// A processed batch on its way through the commit stages.
struct Job {
    /// The topic whose offset the job stores (input or acks).
    topic: Arc<str>,
    partition: Option<i32>,
    next_offset: Option<i64>,
    phase1: Arc<AckGroup>,
    changelog: Vec<ChangelogRecord>,
    /// Append time of the batch's oldest event (end-to-end latency).
    oldest_ts: Option<i64>,
    /// Per command in `phase1`: the input timestamp of the event that caused it and
    /// the probe that learns when the broker acknowledged it (response time).
    commands: Vec<(Option<i64>, Arc<AckGroup>)>,
}

/// State touched by the core loop and the rebalance callbacks (same thread; the
/// mutex is never contended, it only makes the sharing explicit and safe).
struct Core {
    op: Detector,
    resp: Responder,
    decoder: Decoder,
    buffers: BTreeMap<i32, PartBuf>,
    owned: BTreeSet<i32>,
    /// The offset expected next on each owned input partition: its committed offset
    /// right after an assignment, then the offset after the last record consumed.
    /// A record past it is a gap (`InputGap`); one below it a rewind
    /// (`OffsetsRewound`). Checked on every record, not only at resume.
    expected: HashMap<i32, i64>,
    /// The same for the acks topic's partitions.
    expected_acks: HashMap<i32, i64>,
}

/// Check a consumed record's offset against the one expected next on its partition
/// and advance the expectation. Returns the gap (records skipped) or the rewind.
fn check_contiguity(expected: &mut HashMap<i32, i64>, partition: i32, offset: i64) -> Option<Result<i64, i64>> {
    let found = expected.insert(partition, offset + 1)?;
    match offset.cmp(&found) {
        std::cmp::Ordering::Equal => None,
        std::cmp::Ordering::Greater => Some(Ok(found)),
        std::cmp::Ordering::Less => Some(Err(found)),
    }
}

struct Shared {
    cfg: Config,
    verdicts_topic: Arc<str>,
    dlq_topic: Arc<str>,
    input_topic: Arc<str>,
    acks_topic: Arc<str>,
    alerts_topic: Arc<str>,
    commands_topic: Arc<str>,
    audit_topic: Arc<str>,
    /// Confidence gating, fed by the control thread (feedback, alerts) and the
    /// changelog stage (response times); read by the core per batch.
    gate: Arc<Mutex<Gate>>,
    /// The control thread has read the alerts and feedback topics to their end once:
    /// the gate reflects what analysts said before this start.
    gate_caught_up: AtomicBool,
    schema_id: String,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Set on an unrecoverable error; stops everything without storing offsets.
    abort: AtomicBool,
    /// The first fatal error was a lost assignment: the process may rejoin.
    lost: AtomicBool,
    fatal: Mutex<Option<String>>,
    inflight: Mutex<HashMap<i32, usize>>,
    inflight_cv: Condvar,
    /// Committed input offsets (next record to read) per partition, as acknowledged
    /// by the group coordinator: what a restart would resume from.
    committed: Mutex<HashMap<i32, i64>>,
    core: Mutex<Core>,
    producer: SinkProducer,
    /// Commands go out on a producer of their own, so they do not queue behind the
    /// bulk of verdicts, audit and changelog records (response time).
    command_producer: SinkProducer,
    to_changelog: Mutex<Option<SyncSender<Job>>>,
    /// The SQL tables, when served: fed with twin rows and outputs.
    observer: Option<Arc<dyn StateObserver>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "pipeline failing");
        self.metrics.failed.lock().expect("failed lock").get_or_insert_with(|| msg.clone());
        let mut f = self.fatal.lock().expect("fatal lock");
        if f.is_none() {
            *f = Some(msg);
        }
        self.abort.store(true, Ordering::SeqCst);
        self.inflight_cv.notify_all();
    }

    fn failed(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }

    fn inflight_add(&self, p: i32) {
        *self.inflight.lock().expect("inflight lock").entry(p).or_default() += 1;
    }

    fn inflight_done(&self, p: i32) {
        let mut m = self.inflight.lock().expect("inflight lock");
        if let Some(n) = m.get_mut(&p) {
            *n = n.saturating_sub(1);
        }
        self.inflight_cv.notify_all();
    }

    /// Wait until no batch of `parts` awaits acknowledgement (or the pipeline failed).
    fn drain(&self, parts: &[i32]) {
        let mut m = self.inflight.lock().expect("inflight lock");
        while !self.failed() && parts.iter().any(|p| m.get(p).copied().unwrap_or(0) > 0) {
            m = self.inflight_cv.wait_timeout(m, Duration::from_millis(100)).expect("inflight lock").0;
        }
    }

    /// Decode a partition's records, apply them to the twins, and hand the outputs to
    /// the sink. MUST be called with the core lock held.
    fn process(&self, core: &mut Core, partition: i32, recs: Vec<Rec>) -> Result<(), PipelineError> {
        let Some(last) = recs.last().map(|r| r.offset) else { return Ok(()) };
        let span = tracing::info_span!("batch", partition, records = recs.len(), first_offset = recs[0].offset, last_offset = last);
        let _entered = span.enter();
        let consumed = recs.iter().map(|r| r.consumed).min();
        let timer = Instant::now();
        let raw: Vec<RawRecord<'_>> = recs
            .iter()
            .map(|r| RawRecord { partition, offset: r.offset, key: r.key.as_deref(), payload: r.payload.as_deref() })
            .collect();
        let now = chrono::Utc::now().timestamp_millis();
        let decoded = tracing::info_span!("decode").in_scope(|| core.decoder.decode(&raw, now))?;
        ev::StageFinished { stage: "decode", elapsed: timer.elapsed() }.emit();
        let timer = Instant::now();
        let valid = decoded.batch.num_rows();
        let mut outputs: Vec<OutRecord> = Vec::with_capacity(valid + decoded.rejects.len());
        for rej in &decoded.rejects {
            let r = &recs[rej.index];
            ev::RecordRejected { partition, offset: r.offset, code: rej.code, reason: &rej.reason }.emit(&self.metrics);
            outputs.push(dead_letter(
                &self.dlq_topic,
                (self.cfg.topics.input.as_str(), partition, r.offset),
                r.key.clone(),
                r.payload.clone(),
                rej.code.as_str(),
                &rej.reason,
                Some(self.schema_id.as_str()),
            ));
        }
        let skipped_before = core.op.twin().skipped();
        let (scored, _) = tracing::info_span!("detect", events = valid).in_scope(|| core.op.detect(&decoded.batch))?;
        let mut verdicts: Vec<Verdict> = verdicts_from_batch(&scored, &self.cfg.topics.input);
        ev::StageFinished { stage: "detect", elapsed: timer.elapsed() }.emit();
        let timer = Instant::now();
        let respond_span = tracing::info_span!("respond").entered();
        let mut resp = Responses::default();
        let automation = {
            let g = self.gate.lock().expect("gate lock");
            if core.resp.gate_change_pending(partition, g.suspended()) {
                let status = serde_json::to_value(g.status()).expect("gate status serialises");
                core.resp.note_gate(partition, g.suspended(), &status, now, &mut resp);
            }
            !g.suspended()
        };
        let r = core.resp.respond(core.op.twin_mut(), &decoded.batch, &mut verdicts, automation, now);
        resp.alerts.extend(r.alerts);
        resp.commands.extend(r.commands);
        resp.audit.extend(r.audit);
        drop(respond_span);
        ev::StageFinished { stage: "respond", elapsed: timer.elapsed() }.emit();
        record_verdicts(core, &verdicts);
        let mut anomalies = 0;
        let verdict_count = verdicts.len();
        for v in &verdicts {
            anomalies += usize::from(v.anomalous);
            outputs.push(OutRecord {
                topic: self.verdicts_topic.clone(),
                partition: None,
                key: v.device_id.clone().into_bytes(),
                payload: Some(serde_json::to_vec(v).expect("verdict serialises")),
                headers: Vec::new(),
                probe: None,
            });
        }
        let command_ts: Vec<Option<i64>> = if resp.commands.is_empty() {
            Vec::new()
        } else {
            let ts: HashMap<i64, i64> = recs.iter().filter_map(|r| r.ts.map(|t| (r.offset, t))).collect();
            resp.commands.iter().map(|(_, off)| off.and_then(|o| ts.get(&o).copied())).collect()
        };
        let shown = self.emit_responses(resp, &mut outputs);
        ev::BatchProcessed {
            partition,
            records: recs.len(),
            valid,
            verdicts: verdict_count,
            anomalies,
            skipped: core.op.twin().skipped() - skipped_before,
        }
        .emit(&self.metrics);
        let changelog = core.op.twin_mut().drain_changelog();
        self.publish(consumed, &verdicts, shown, &changelog);
        // Twin count per batch (O(partitions)); memory is sampled at expiry ticks (O(twins)).
        ev::TwinsCounted { twins: core.op.twin().store().len() }.emit(&self.metrics);
        let oldest_ts = recs.iter().filter_map(|r| r.ts).min();
        self.dispatch(self.input_topic.clone(), Some(partition), Some(last + 1), outputs, changelog, command_ts, oldest_ts)
    }

    /// Hand one batch's changes to the observer at once (its verdicts, alerts,
    /// commands and changed or removed twins), so a snapshot never shows half of it.
    fn publish(&self, consumed: Option<Instant>, verdicts: &[Verdict], shown: Shown, changelog: &[ChangelogRecord]) {
        if let Some(observer) = &self.observer {
            observer.batch(consumed, verdicts, &shown.alerts, &shown.commands, changelog);
        }
    }

    /// Turn responses into records: alerts and commands keyed by device id, audit
    /// records pinned to their chain's partition.
    /// Returns copies of the alerts and commands for the observer (when there is one).
    fn emit_responses(&self, resp: Responses, outputs: &mut Vec<OutRecord>) -> Shown {
        let rec = |topic: &Arc<str>, partition, key: &str, payload: Vec<u8>| OutRecord {
            topic: topic.clone(),
            partition,
            key: key.as_bytes().to_vec(),
            payload: Some(payload),
            headers: Vec::new(),
            probe: None,
        };
        for a in &resp.alerts {
            ev::AlertRaised { alert: a }.emit(&self.metrics);
            outputs.push(rec(&self.alerts_topic, None, &a.device_id, serde_json::to_vec(a).expect("alert serialises")));
        }
        for (c, _) in &resp.commands {
            ev::CommandIssued { command: c }.emit(&self.metrics);
            outputs.push(rec(&self.commands_topic, None, &c.device_id, serde_json::to_vec(c).expect("command serialises")));
        }
        let shown = match &self.observer {
            Some(_) => Shown { alerts: resp.alerts.clone(), commands: resp.commands.iter().map(|(c, _)| c.clone()).collect() },
            None => Shown::default(),
        };
        for (chain, bytes) in resp.audit {
            ev::AuditWritten { chain }.emit(&self.metrics);
            outputs.push(rec(&self.audit_topic, Some(chain), "", bytes));
        }
        for (chain, kind) in resp.audit_unchained {
            ev::AuditUnchained { partition: chain, kind }.emit(&self.metrics);
        }
        shown
    }

    /// Apply one device acknowledgement (a record of the acks topic, partition
    /// `partition`): reconcile the twin's desired and reported state. A malformed
    /// ack, or one for a device this instance does not hold, goes to the DLQ.
    fn process_ack(&self, core: &mut Core, partition: i32, rec: Rec) -> Result<(), PipelineError> {
        let now = chrono::Utc::now().timestamp_millis();
        let mut resp = Responses::default();
        let mut outputs = Vec::new();
        let parsed: Result<Ack, String> = parse_control::<Ack>(rec.payload.as_deref(), "an ack")
            .and_then(|a| if a.v == RESPONSE_VERSION { Ok(a) } else { Err(format!("ack version {} unsupported (expected {RESPONSE_VERSION})", a.v)) });
        let outcome = parsed.and_then(|ack| core.resp.apply_ack(core.op.twin_mut(), partition, &ack, now, &mut resp).map(|o| (ack, o)));
        match outcome {
            Ok((ack, o)) => ev::AckApplied { device: &ack.device_id, command: &ack.command_id, reconciled: o == AckOutcome::Reconciled }.emit(&self.metrics),
            Err(reason) => outputs.push(self.control_dead_letter(&self.acks_topic, partition, rec.offset, rec.key.clone(), rec.payload.clone(), &reason)),
        }
        let shown = self.emit_responses(resp, &mut outputs);
        let changelog = core.op.twin_mut().drain_changelog();
        self.publish(Some(rec.consumed), &[], shown, &changelog);
        self.dispatch(self.acks_topic.clone(), Some(partition), Some(rec.offset + 1), outputs, changelog, Vec::new(), None)
    }

    /// A dead letter for a record of a control topic (acks, feedback).
    fn control_dead_letter(&self, topic: &Arc<str>, partition: i32, offset: i64, key: Option<Vec<u8>>, payload: Option<Vec<u8>>, reason: &str) -> OutRecord {
        let reason = &*bound_reason(reason);
        ev::ControlRejected { topic, partition, offset, reason }.emit(&self.metrics);
        dead_letter(&self.dlq_topic, (&**topic, partition, offset), key, payload, "invalid_control_record", reason, None)
    }

    fn dispatch(
        &self,
        topic: Arc<str>,
        partition: Option<i32>,
        next_offset: Option<i64>,
        outputs: Vec<OutRecord>,
        changelog: Vec<ChangelogRecord>,
        command_ts: Vec<Option<i64>>,
        oldest_ts: Option<i64>,
    ) -> Result<(), PipelineError> {
        let phase1 = AckGroup::new(outputs.len());
        // Commands are acknowledged through probes, in the order they were emitted.
        let mut outputs = outputs;
        let mut commands = Vec::with_capacity(command_ts.len());
        let mut ts = command_ts.into_iter();
        for r in outputs.iter_mut().filter(|r| r.topic == self.commands_topic) {
            let probe = AckGroup::probe(&phase1);
            r.probe = Some(probe.clone());
            commands.push((ts.next().flatten(), probe));
        }
        if let Some(p) = partition {
            self.inflight_add(p);
        }
        if commands.is_empty() {
            kafka::send_all(&self.producer, &outputs, &phase1, &self.abort);
        } else {
            let (cmds, rest): (Vec<OutRecord>, Vec<OutRecord>) = outputs.into_iter().partition(|r| r.topic == self.commands_topic);
            kafka::send_all(&self.command_producer, &cmds, &phase1, &self.abort);
            kafka::send_all(&self.producer, &rest, &phase1, &self.abort);
        }
        let tx = self.to_changelog.lock().expect("sender lock").clone();
        let job = Job { topic, partition, next_offset, phase1, changelog, oldest_ts, commands };
        match tx.map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => {
                if let Some(p) = partition {
                    self.inflight_done(p);
                }
                Err(PipelineError::Fatal("the commit stages have stopped (after an earlier failure)".into()))
            }
        }
    }

    /// Process every buffered record of `parts` (all partitions when None).
    fn flush(&self, core: &mut Core, parts: Option<&[i32]>) -> Result<(), PipelineError> {
        let keys: Vec<i32> = core.buffers.keys().copied().filter(|p| parts.is_none_or(|ps| ps.contains(p))).collect();
        for p in keys {
            if let Some(buf) = core.buffers.remove(&p) {
                self.process(core, p, buf.records)?;
            }
        }
        Ok(())
    }

    fn restore(&self, core: &mut Core, parts: &[i32], deadline: Instant) -> Result<(), PipelineError> {
        let started = Instant::now();
        let left = || deadline.saturating_duration_since(Instant::now());
        // A long restore is progress, not a stall (/healthz).
        ev::Heartbeat.emit(&self.metrics);
        for &p in parts {
            core.op.twin_mut().store_mut().drop_partition(p);
            core.op.twin_mut().store_mut().ensure_partition(p);
        }
        let op = &mut core.op;
        let cap = self.cfg.state.max_twin_bytes;
        let mut quarantined: Vec<OutRecord> = Vec::new();
        let changelog = self.cfg.topics.changelog.as_str();
        let read = kafka::read_changelog_at(&self.cfg, parts, left(), |p, offset, key, value| {
            match restore_verdict(key, value, cap, |k, v| op.twin_mut().restore_record(p, k, v)) {
                Restore::Done => Ok(()),
                Restore::Fatal(e) => Err(PipelineError::from(e)),
                Restore::Quarantine(reason) => {
                    ev::ChangelogQuarantined { partition: p, offset, key, reason: &reason }.emit(&self.metrics);
                    // The device starts over; a twin it had is gone from memory.
                    op.twin_mut().restore_record(p, key, None).map_err(PipelineError::from)?;
                    quarantined.push(dead_letter(
                        &self.dlq_topic,
                        (changelog, p, offset),
                        Some(key.as_bytes().to_vec()),
                        value.map(<[u8]>::to_vec),
                        QUARANTINED_CHANGELOG,
                        &reason,
                        Some(self.schema_id.as_str()),
                    ));
                    Ok(())
                }
            }
        })?;
        if !quarantined.is_empty() {
            // Set aside before the partition is served: a crash now re-reads the
            // changelog and quarantines the same records again (at least once).
            let group = AckGroup::new(quarantined.len());
            kafka::send_all(&self.producer, &quarantined, &group, &self.abort);
            group.wait(&self.abort).map_err(|e| PipelineError::Fatal(format!("dead letters for quarantined changelog records: {e}")))?;
            ev::QuarantineDeadLettered { records: quarantined.len() }.emit(&self.metrics);
        }
        if let Some(observer) = &self.observer {
            let restored: Vec<&Twin> = core.op.twin().store().iter().filter(|t| parts.contains(&t.partition)).collect();
            observer.restored(&restored);
        }
        for (p, n) in read {
            let twins = core.op.twin().store().iter().filter(|t| t.partition == p).count();
            ev::TwinsRestored { partition: p, twins, records_read: n, millis: started.elapsed().as_millis() }.emit(&self.metrics);
        }
        // The audit topic is its own durable head: continue each chain from the last
        // record acknowledged on its partition.
        if core.resp.audit_mut().is_some() {
            for &p in parts {
                ev::Heartbeat.emit(&self.metrics);
                let tail = kafka::read_tail(&self.cfg, &self.cfg.topics.audit, p, left())?;
                core.resp.continue_chain(p, tail.as_deref()).map_err(|e| {
                    PipelineError::Fatal(format!(
                        "audit chain of partition {p} of `{}` cannot be continued: its last record is {e}; run `twinguard audit verify`",
                        self.cfg.topics.audit
                    ))
                })?;
            }
        }
        Ok(())
    }
}

impl Shared {
    /// Compare the restored twins of `parts` with their input partitions' ends: a
    /// twin whose last applied offset is at or past the end claims events the
    /// partition does not hold (the input topic was recreated or truncated), and the
    /// replay guard would skip new events up to that offset. Reported loudly
    /// (`TwinsAheadOfInput`), never acted on silently.
    fn check_twins_against_input<C: ConsumerContext>(&self, core: &Core, consumer: &BaseConsumer<C>, parts: &[i32]) {
        for &p in parts {
            let (n, max) = core
                .op
                .twin()
                .store()
                .iter()
                .filter(|t| t.partition == p)
                .fold((0usize, -1i64), |(n, m), t| (n, m.max(t.last_offset)));
            if n == 0 {
                continue;
            }
            match consumer.fetch_watermarks(&self.cfg.topics.input, p, Duration::from_secs(3)) {
                Ok((_, high)) if max >= high => {
                    let twins = core.op.twin().store().iter().filter(|t| t.partition == p && t.last_offset >= high).count();
                    ev::TwinsAheadOfInput { partition: p, high_watermark: high, twins, max_last_offset: max }.emit(&self.metrics);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(partition = p, error = %e, "input watermarks not read: restored twins not checked against the partition's end"),
            }
        }
    }
}

/// Alerts and commands of one batch, copied for the observer.
#[derive(Default)]
struct Shown {
    alerts: Vec<Alert>,
    commands: Vec<twinguard_schemas::respond::Command>,
}

/// Note each verdict's score on its twin (latest score, risk) and count verdicts by
/// class and scores per model.
fn record_verdicts(core: &mut Core, verdicts: &[Verdict]) {
    let mut by_class: HashMap<&str, u64> = HashMap::new();
    let mut scores: Vec<(&'static str, f64)> = Vec::with_capacity(verdicts.len() * 5);
    for v in verdicts {
        core.op.twin_mut().note_verdict(v.source.partition, &v.device_id, v.score, v.attack_class.as_deref());
        let class = match (&v.attack_class, v.anomalous) {
            (Some(c), _) => c.as_str(),
            (None, true) => "anomaly",
            (None, false) => "benign",
        };
        *by_class.entry(class).or_default() += 1;
        match &v.scores {
            Some(sc) => scores.extend([("ensemble", sc.ensemble), ("rf", sc.rf), ("svm", sc.svm), ("lstm", sc.lstm), ("twin", sc.twin)]),
            None => scores.push(("twin", v.score)),
        }
    }
    let by_class: Vec<(&str, u64)> = by_class.into_iter().collect();
    ev::VerdictsScored { by_class: &by_class, scores: &scores }.emit();
}

/// A dead letter for the DLQ topic: the original key and bytes with the reason, a
/// stable code and the source coordinates in headers. It fits the broker's message
/// size whatever the input (see [`DeadLetter::build`]).
fn dead_letter(
    dlq_topic: &Arc<str>,
    (topic, partition, offset): (&str, i32, i64),
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
    code: &str,
    reason: &str,
    schema: Option<&str>,
) -> OutRecord {
    let dl = DeadLetter::build(Source { topic, partition, offset }, key, payload, code, reason, schema);
    OutRecord { topic: dlq_topic.clone(), partition: None, key: dl.key, payload: Some(dl.value), headers: dl.headers, probe: None }
}

/// DLQ code of a changelog record that could not be restored.
pub const QUARANTINED_CHANGELOG: &str = "quarantined_changelog";

/// What restoring one changelog record came to.
pub enum Restore {
    Done,
    /// Set the record aside (dead letter + metric) and go on without it: it does not
    /// decode, or it is larger than `state.max_twin_bytes`.
    Quarantine(String),
    /// Stop: the changelog belongs to another schema or shape (a configuration
    /// error, not a bad record: quarantining would discard every twin).
    Fatal(twinguard_operators::OperatorError),
}

/// Restore one changelog record through `apply`, sorting failures into quarantine
/// (the record) and fatal (the configuration). The same rule serves `twinguard run`
/// and `twinguard sql`.
pub fn restore_verdict(
    key: &str,
    value: Option<&[u8]>,
    max_twin_bytes: usize,
    apply: impl FnOnce(&str, Option<&[u8]>) -> Result<(), twinguard_operators::OperatorError>,
) -> Restore {
    if let Some(v) = value.filter(|v| v.len() > max_twin_bytes) {
        return Restore::Quarantine(format!("changelog record is {} bytes, state.max_twin_bytes is {max_twin_bytes}", v.len()));
    }
    match apply(key, value) {
        Ok(()) => Restore::Done,
        Err(e @ twinguard_operators::OperatorError::Undecodable { .. }) => Restore::Quarantine(e.to_string()),
        Err(e) => Restore::Fatal(e),
    }
}

/// Consumer context: runs the rebalance protocol of the spine.
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag of the
    /// owned input partitions, as librdkafka computes it from its fetch state.
    fn stats(&self, stats: rdkafka::Statistics) {
        let s = &self.shared;
        let Some(topic) = stats.topics.get(&s.cfg.topics.input) else { return };
        let owned = s.metrics.owned();
        let lag = topic.partitions.iter().filter(|(p, part)| owned.contains(p) && part.consumer_lag >= 0).map(|(p, part)| (*p, part.consumer_lag)).collect();
        ev::LagSampled { lag }.emit(&s.metrics);
    }
}

fn input_partitions(tpl: &TopicPartitionList, topic: &str) -> Vec<i32> {
    tpl.elements_for_topic(topic).iter().map(|e| e.partition()).collect()
}

impl ConsumerContext for SourceContext {
    /// Revoke: finish the revoked partitions' buffered records, wait until all their
    /// outputs are acknowledged and offsets stored, and commit, so the next owner
    /// starts exactly where this instance stopped.
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        let Rebalance::Revoke(tpl) = rebalance else { return };
        let parts = input_partitions(tpl, &s.cfg.topics.input);
        ev::Rebalanced { kind: "revoke", partitions: &parts }.emit(&s.metrics);
        let lost = consumer.assignment_lost();
        if lost {
            // This member was evicted (it stopped polling past max.poll.interval.ms, or
            // its session timed out, e.g. a paused process): another member may own
            // these partitions already. Fail-stop, and drop what is still queued, so
            // no late changelog or audit record of this zombie lands after the new
            // owner's (a twin moving backwards, a forked audit chain). Offsets stay
            // where delivery put them; the new owner replays from there.
            let msg = format!("assignment of partitions {parts:?} lost (evicted from the group: max.poll.interval.ms exceeded or session timed out); stopping so that only the new owner writes their state");
            if s.fatal.lock().expect("fatal lock").is_none() {
                s.lost.store(true, Ordering::SeqCst);
            }
            s.fail(msg);
            let purge = rdkafka::producer::PurgeConfig::default().queue();
            rdkafka::producer::Producer::purge(&s.producer, purge);
            rdkafka::producer::Producer::purge(&s.command_producer, purge);
        } else {
            let mut core = s.core.lock().expect("core lock");
            if let Err(e) = s.flush(&mut core, Some(&parts)) {
                s.fail(format!("flushing revoked partitions: {e}"));
            }
        }
        s.drain(&parts);
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "commit on revoke failed; the next owner may replay some records"),
        }
        // The twins go with the partition: whoever owns it next (this instance
        // included) restores them from the changelog, which now holds all of them.
        let mut core = s.core.lock().expect("core lock");
        for p in &parts {
            core.buffers.remove(p);
            core.expected.remove(p);
            core.expected_acks.remove(p);
            core.owned.remove(p);
            core.op.twin_mut().store_mut().drop_partition(*p);
            core.resp.drop_partition(*p);
            s.committed.lock().expect("committed lock").remove(p);
            if let Some(observer) = &s.observer {
                observer.partition_dropped(*p);
            }
        }
        ev::PartitionsReleased { owned: &core.owned.iter().copied().collect::<Vec<_>>() }.emit(&s.metrics);
    }

    /// Remember what the coordinator acknowledged: idle expiry only removes twins
    /// whose events lie below these offsets.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_err() {
            return;
        }
        let mut c = self.shared.committed.lock().expect("committed lock");
        for e in offsets.elements_for_topic(&self.shared.cfg.topics.input) {
            // A commit can succeed as a whole and fail for single partitions: only
            // what the coordinator accepted is durable.
            if e.error().is_err() {
                continue;
            }
            if let rdkafka::Offset::Offset(o) = e.offset() {
                c.insert(e.partition(), o);
            }
        }
    }

    /// Assign: restore the twins of newly owned partitions from the changelog before
    /// any of their records is processed.
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let s = &self.shared;
        let Rebalance::Assign(tpl) = rebalance else {
            if let Rebalance::Error(e) = rebalance {
                tracing::warn!(error = %e, "rebalance error");
            }
            return;
        };
        let parts = input_partitions(tpl, &s.cfg.topics.input);
        ev::Rebalanced { kind: "assign", partitions: &parts }.emit(&s.metrics);
        let mut core = s.core.lock().expect("core lock");
        let fresh: Vec<i32> = parts.iter().copied().filter(|p| !core.owned.contains(p)).collect();
        // One deadline for the whole callback (restore, audit tails, checks), below
        // max.poll.interval.ms (validated at start).
        let deadline = Instant::now() + Duration::from_secs(s.cfg.batch.restore_timeout_secs);
        if let Err(e) = s.restore(&mut core, &fresh, deadline) {
            s.fail(format!("restoring twins of partitions {fresh:?}: {e}"));
            return;
        }
        core.owned.extend(parts.iter().copied());
        let resume = resume_offsets(consumer, &s.cfg.topics.input, &fresh);
        s.check_twins_against_input(&core, consumer, &fresh);
        core.expected.extend(resume);
        ev::PartitionsReady { owned: &core.owned.iter().copied().collect::<Vec<_>>(), twins: core.op.twin().store().len() }.emit(&s.metrics);
    }
}

/// The committed offsets `parts` of `topic` resume at (a broker round trip). Parts
/// without one (they start by `auto.offset.reset`) are left out, and so is
/// everything when the coordinator does not answer: this only feeds a warning.
fn resume_offsets<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, parts: &[i32]) -> HashMap<i32, i64> {
    if parts.is_empty() {
        return HashMap::new();
    }
    let mut tpl = TopicPartitionList::new();
    for p in parts {
        tpl.add_partition(topic, *p);
    }
    // Runs inside the assign callback with the core lock held: keep the wait short.
    match consumer.committed_offsets(tpl, Duration::from_secs(3)) {
        Ok(c) => c
            .elements_for_topic(topic)
            .iter()
            .filter_map(|e| if let rdkafka::Offset::Offset(o) = e.offset() { Some((e.partition(), o)) } else { None })
            .collect(),
        Err(e) => {
            tracing::warn!(error = %e, "committed offsets not read: resume gaps go unchecked for this assignment");
            HashMap::new()
        }
    }
}

/// What a run ended with.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub twins: usize,
    pub twin_mem_bytes: usize,
    /// (twins whose desired state equals their reported state, twins with a desired state).
    pub reconciled: (usize, usize),
}

/// Run the pipeline until `stop` is set (graceful: buffered records are processed,
/// outputs acknowledged, offsets committed) or a fatal error occurs (no offsets are
/// stored past the failure; a restart replays from the last committed position).
pub fn run(cfg: &Config, metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> Result<RunReport, PipelineError> {
    run_with(cfg, metrics, stop, None)
}

/// [`run_with`], rejoining the group as a new member each time this member's
/// assignment is lost (it was evicted while it or the broker was paused) instead of
/// exiting, as a Kafka Streams thread does: the lost run stopped writing first
/// (fail-stop, queues purged), the new one restores from the changelog and resumes
/// from the committed offsets. Any other error ends the run.
pub fn run_rejoining(cfg: &Config, metrics: Arc<Metrics>, stop: Arc<AtomicBool>, observer: Option<Arc<dyn StateObserver>>) -> Result<RunReport, PipelineError> {
    loop {
        match run_with(cfg, metrics.clone(), stop.clone(), observer.clone()) {
            Err(PipelineError::AssignmentLost(why)) if !stop.load(Ordering::Relaxed) => {
                ev::GroupRejoining { reason: &why }.emit(&metrics);
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// [`run`], also telling `observer` (the SQL view) about this instance's twins and outputs.
pub fn run_with(cfg: &Config, metrics: Arc<Metrics>, stop: Arc<AtomicBool>, observer: Option<Arc<dyn StateObserver>>) -> Result<RunReport, PipelineError> {
    let schema = cfg.event_schema()?;
    let detector = build::detector(cfg, &schema)?;
    let responder = build::responder(cfg, &schema)?;
    ev::PipelineConfigured {
        schema: &schema.id(),
        model: detector.model_version(),
        no_rules: responder.config().rules.is_empty(),
        no_audit: cfg.audit.signing_key_file.is_none(),
    }
    .emit(&metrics);
    if !kafka::wait_for_brokers(cfg, &stop, || ev::Heartbeat.emit(&metrics))? {
        return Ok(RunReport::default());
    }
    let partitions = kafka::ensure_topics(cfg)?;
    ev::PipelineStarted { input: &cfg.topics.input, partitions, schema: &schema.id(), model: detector.model_version() }.emit();
    let producer = kafka::create_producer(cfg)?;
    let command_producer = kafka::create_command_producer(cfg)?;
    let (tx_cl, rx_cl) = sync_channel::<Job>(cfg.batch.max_inflight_batches);
    let (tx_off, rx_off) = sync_channel::<(Job, Arc<AckGroup>)>(cfg.batch.max_inflight_batches);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        verdicts_topic: cfg.topics.verdicts.as_str().into(),
        dlq_topic: cfg.topics.dlq.as_str().into(),
        input_topic: cfg.topics.input.as_str().into(),
        acks_topic: cfg.topics.acks.as_str().into(),
        alerts_topic: cfg.topics.alerts.as_str().into(),
        commands_topic: cfg.topics.commands.as_str().into(),
        audit_topic: cfg.topics.audit.as_str().into(),
        gate: Arc::new(Mutex::new(build::gate(cfg)?)),
        gate_caught_up: AtomicBool::new(false),
        schema_id: schema.id(),
        metrics: metrics.clone(),
        stop: stop.clone(),
        abort: AtomicBool::new(false),
        lost: AtomicBool::new(false),
        fatal: Mutex::new(None),
        inflight: Mutex::new(HashMap::new()),
        inflight_cv: Condvar::new(),
        committed: Mutex::new(HashMap::new()),
        core: Mutex::new(Core {
            op: detector,
            resp: responder,
            decoder: Decoder::new(schema.clone(), cfg.decode_limits()),
            buffers: BTreeMap::new(),
            owned: BTreeSet::new(),
            expected: HashMap::new(),
            expected_acks: HashMap::new(),
        }),
        producer,
        command_producer,
        to_changelog: Mutex::new(Some(tx_cl)),
        observer,
    });
    let consumer: Arc<BaseConsumer<SourceContext>> = Arc::new(
        kafka::consumer_config(cfg)
            .create_with_context(SourceContext { shared: shared.clone() })
            .map_err(|e| PipelineError::kafka("create consumer", e))?,
    );
    // Acks are co-partitioned with the input: the range assignor gives partition p of
    // both to the same instance, the one holding the twins of partition p.
    consumer.subscribe(&[&cfg.topics.input, &cfg.topics.acks]).map_err(|e| PipelineError::kafka("subscribe", e))?;
    let control = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("tg-control".into())
            .spawn(move || control_loop(&s))
            .map_err(|e| PipelineError::io("starting the control thread", e))?
    };
    // No event is processed before the gate has caught up with the feedback given
    // before this start: a restart must not act while automation was suspended.
    let deadline = Instant::now() + Duration::from_secs(cfg.batch.restore_timeout_secs);
    while !shared.gate_caught_up.load(Ordering::SeqCst) && !shared.failed() && !stop.load(Ordering::Relaxed) {
        if Instant::now() > deadline {
            shared.fail(format!("reading `{}` and `{}` to their end timed out", cfg.topics.alerts, cfg.topics.feedback));
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if shared.gate.lock().expect("gate lock").suspended() {
        tracing::warn!("starting with automated responses SUSPENDED (analyst feedback before this start)");
    }

    let changelog_stage = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("tg-changelog".into())
            .spawn(move || changelog_stage(&s, rx_cl, tx_off))
            .map_err(|e| PipelineError::io("starting the changelog thread", e))?
    };
    let offsets_stage = {
        let s = shared.clone();
        let c = consumer.clone();
        std::thread::Builder::new()
            .name("tg-offsets".into())
            .spawn(move || offsets_stage(&s, &c, rx_off))
            .map_err(|e| PipelineError::io("starting the offsets thread", e))?
    };

    let result = core_loop(&shared, &consumer);
    if let Err(e) = &result {
        shared.fail(e.to_string());
    }
    if !shared.failed() {
        let mut core = shared.core.lock().expect("core lock");
        if let Err(e) = shared.flush(&mut core, None) {
            shared.fail(format!("flushing on shutdown: {e}"));
        }
    }
    // Closing the first channel lets both stages drain and exit in order.
    shared.to_changelog.lock().expect("sender lock").take();
    let _ = changelog_stage.join();
    let _ = offsets_stage.join();
    let _ = control.join();
    if !shared.failed() {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final commit failed"),
        }
    }
    consumer.unsubscribe();
    let report = {
        let core = shared.core.lock().expect("core lock");
        let commanded: Vec<_> = core.op.twin().store().iter().filter(|t| !t.response().desired.is_empty()).collect();
        RunReport {
            twins: core.op.twin().store().len(),
            twin_mem_bytes: core.op.twin().store().mem_bytes(),
            reconciled: (commanded.iter().filter(|t| t.response().delta().is_empty()).count(), commanded.len()),
        }
    };
    drop(consumer);
    if let Some(msg) = shared.fatal.lock().expect("fatal lock").clone() {
        if shared.lost.load(Ordering::SeqCst) {
            return Err(PipelineError::AssignmentLost(msg));
        }
        return Err(PipelineError::Fatal(msg));
    }
    Ok(report)
}

/// The core loop's longest consumer poll: how soon it notices `stop`.
const POLL_MAX: Duration = Duration::from_millis(100);

fn core_loop(s: &Arc<Shared>, consumer: &BaseConsumer<SourceContext>) -> Result<(), PipelineError> {
    let linger = Duration::from_millis(s.cfg.batch.max_linger_ms);
    let flush_when_idle = s.cfg.batch.flush_when_idle;
    let mut empty_polls = 0u32;
    let max = s.cfg.batch.max_records;
    let expiry_every = Duration::from_secs(s.cfg.batch.expiry_interval_secs.max(1));
    let mut last_expiry = Instant::now();
    let input = s.cfg.topics.input.clone();
    ev::StallLimitSet { millis: ((s.cfg.batch.restore_timeout_secs + 60) * 1000) as i64 }.emit(&s.metrics);
    while !s.stop.load(Ordering::Relaxed) && !s.failed() {
        ev::Heartbeat.emit(&s.metrics);
        let timeout = {
            let core = s.core.lock().expect("core lock");
            match core.buffers.values().map(|b| linger.saturating_sub(b.opened.elapsed())).min() {
                // Something is buffered: with `flush_when_idle`, only take what is
                // ready now (empty polls close the open batches below).
                Some(_) if flush_when_idle => Duration::ZERO,
                // Capped like the idle wait: the loop must see `stop` (SIGTERM)
                // within 100 ms, whatever the linger.
                Some(left) => left.clamp(Duration::from_millis(1), POLL_MAX),
                None => POLL_MAX,
            }
        };
        let polled = consumer.poll(timeout);
        // A zero-timeout poll also comes back empty after serving a statistics or
        // commit event: only two empty polls in a row mean nothing is ready.
        empty_polls = if polled.is_none() { empty_polls + 1 } else { 0 };
        let drained = empty_polls >= 2;
        if s.failed() {
            // A callback inside poll failed (e.g. a restore): process nothing more.
            break;
        }
        let mut core = s.core.lock().expect("core lock");
        match polled {
            None => {}
            Some(Err(e)) => tracing::warn!(error = %e, "consumer error (librdkafka retries)"),
            Some(Ok(m)) if m.topic() == input => {
                let p = m.partition();
                match check_contiguity(&mut core.expected, p, m.offset()) {
                    Some(Ok(at)) => ev::InputGap { partition: p, resumed_at: at, first_offset: m.offset() }.emit(&s.metrics),
                    Some(Err(at)) => ev::OffsetsRewound { topic: &input, partition: p, expected: at, offset: m.offset() }.emit(&s.metrics),
                    None => {}
                }
                let buf = core.buffers.entry(p).or_insert_with(|| PartBuf { records: Vec::with_capacity(max.min(64)), opened: Instant::now() });
                buf.records.push(Rec {
                    offset: m.offset(),
                    ts: m.timestamp().to_millis(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    consumed: Instant::now(),
                });
                if buf.records.len() >= max {
                    let recs = core.buffers.remove(&p).map(|b| b.records).unwrap_or_default();
                    s.process(&mut core, p, recs)?;
                }
            }
            Some(Ok(m)) if m.topic() == &*s.acks_topic => {
                let rec = Rec {
                    offset: m.offset(),
                    ts: None,
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().map(<[u8]>::to_vec),
                    consumed: Instant::now(),
                };
                ev::ControlRecordRead { ack: true }.emit(&s.metrics);
                let p = m.partition();
                match check_contiguity(&mut core.expected_acks, p, m.offset()) {
                    Some(Ok(at)) => ev::ControlGap { topic: &s.acks_topic, partition: p, expected: at, offset: m.offset() }.emit(&s.metrics),
                    Some(Err(at)) => ev::OffsetsRewound { topic: &s.acks_topic, partition: p, expected: at, offset: m.offset() }.emit(&s.metrics),
                    None => {}
                }
                s.process_ack(&mut core, p, rec)?;
            }
            Some(Ok(m)) => tracing::warn!(topic = m.topic(), "record from an unexpected topic ignored"),
        }
        let due: Vec<i32> = core
            .buffers
            .iter()
            .filter(|(_, b)| (drained && flush_when_idle) || b.opened.elapsed() >= linger)
            .map(|(p, _)| *p)
            .collect();
        for p in due {
            let recs = core.buffers.remove(&p).map(|b| b.records).unwrap_or_default();
            s.process(&mut core, p, recs)?;
        }
        if last_expiry.elapsed() >= expiry_every {
            last_expiry = Instant::now();
            let durable: HashMap<i32, i64> = {
                let c = s.committed.lock().expect("committed lock");
                core.owned.iter().filter_map(|p| c.get(p).map(|o| (*p, *o))).collect()
            };
            let now_ms = chrono::Utc::now().timestamp_millis();
            let e = core.op.twin_mut().expire(&durable, now_ms);
            if e.capped > 0 {
                ev::ExpiryCapped { expired: e.expired, left: e.capped }.emit(&s.metrics);
            }
            let expired = e.expired + e.evicted;
            ev::TwinResetsCounted { resets: core.op.twin().resets(), shed: core.op.twin().shed() }.emit(&s.metrics);
            // Commands whose device never acknowledged them.
            let now = chrono::Utc::now().timestamp_millis();
            {
                let mut g = s.gate.lock().expect("gate lock");
                if let Some(t) = g.tick(now) {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
                ev::GateSampled { status: g.status().clone() }.emit(&s.metrics);
            }
            ev::StateSampled { twins: core.op.twin().store().len(), mem_bytes: core.op.twin().store().mem_bytes(), expired }.emit(&s.metrics);
            let Core { op, resp, .. } = &mut *core;
            let unacked = resp.expire_commands(op.twin_mut(), now);
            // One job per partition, counted in flight like a batch, so a revoke waits
            // for its tombstones and expiry alerts too.
            let mut by_partition: BTreeMap<i32, (Responses, Vec<ChangelogRecord>)> =
                unacked.into_iter().map(|(p, r)| (p, (r, Vec::new()))).collect();
            for rec in core.op.twin_mut().drain_changelog() {
                by_partition.entry(rec.partition).or_default().1.push(rec);
            }
            for (p, (resp, recs)) in by_partition {
                let mut outputs = Vec::new();
                let shown = s.emit_responses(resp, &mut outputs);
                s.publish(None, &[], shown, &recs);
                s.dispatch(s.input_topic.clone(), Some(p), None, outputs, recs, Vec::new(), None)?;
            }
        }
    }
    Ok(())
}

fn changelog_stage(s: &Shared, rx: Receiver<Job>, tx: SyncSender<(Job, Arc<AckGroup>)>) {
    let topic: Arc<str> = s.cfg.topics.changelog.as_str().into();
    for job in rx {
        if let Err(e) = job.phase1.wait(&s.abort) {
            s.fail(e);
            break;
        }
        if let Some(ts) = job.oldest_ts {
            let ms = (chrono::Utc::now().timestamp_millis() - ts).max(0) as u64;
            ev::OutputsAcknowledged { latency: Duration::from_millis(ms) }.emit();
        }
        if !job.commands.is_empty() {
            // Response time: the event entered the input topic → its command was
            // acknowledged by the broker (the probe's delivery report).
            let now = chrono::Utc::now().timestamp_millis();
            let mut gate = s.gate.lock().expect("gate lock");
            for (ts, probe) in &job.commands {
                let (Some(ts), Some(acked)) = (ts, probe.acked_at_ms()) else { continue };
                let ms = (acked - ts).max(0) as f64;
                ev::ResponseTimeObserved { millis: ms }.emit(&s.metrics);
                if let Some(t) = gate.observe_response_ms(ms, now) {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
            }
        }
        let records: Vec<OutRecord> = job
            .changelog
            .iter()
            .map(|c| OutRecord {
                topic: topic.clone(),
                partition: Some(c.partition),
                key: c.key.clone().into_bytes(),
                payload: c.value.clone(),
                headers: Vec::new(),
                probe: None,
            })
            .collect();
        let group = AckGroup::new(records.len());
        kafka::send_all(&s.producer, &records, &group, &s.abort);
        ev::ChangelogWritten { records: records.len() }.emit(&s.metrics);
        if tx.send((job, group)).is_err() {
            break;
        }
    }
}

fn offsets_stage(s: &Shared, consumer: &BaseConsumer<SourceContext>, rx: Receiver<(Job, Arc<AckGroup>)>) {
    for (job, group) in rx {
        if let Err(e) = group.wait(&s.abort) {
            s.fail(e);
            break;
        }
        if let (Some(p), Some(next)) = (job.partition, job.next_offset) {
            // rd_kafka_offset_store takes the last processed offset and stores
            // `offset + 1`, the next record to read.
            match consumer.store_offset(&job.topic, p, next - 1) {
                Ok(()) => ev::OffsetsStored { partition: p, next_offset: next }.emit(&s.metrics),
                Err(e) => tracing::warn!(partition = p, error = %e, "cannot store offset (partition revoked?)"),
            }
        }
        if let Some(p) = job.partition {
            s.inflight_done(p);
        }
    }
}

/// The control thread: reads the alerts and feedback topics (every partition, from
/// the beginning) into the confidence gate, so every instance computes the same
/// figures and a restart rebuilds them. Malformed feedback goes to the DLQ.
fn control_loop(s: &Shared) {
    let consumer = match kafka::assign_all(&s.cfg, &[&s.cfg.topics.alerts, &s.cfg.topics.feedback], "control") {
        Ok(c) => c,
        Err(e) => {
            s.fail(format!("control consumer (alerts, feedback): {e}"));
            return;
        }
    };
    let feedback_topic: Arc<str> = s.cfg.topics.feedback.as_str().into();
    // Caught up once every partition was read up to the end it had at start.
    let mut pending: HashMap<(String, i32), i64> = HashMap::new();
    let assigned: Vec<(String, i32)> = consumer
        .assignment()
        .map(|a| a.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect())
        .unwrap_or_default();
    for (topic, p) in assigned {
        match consumer.fetch_watermarks(&topic, p, Duration::from_secs(10)) {
            Ok((low, high)) if high > low => {
                pending.insert((topic, p), high);
            }
            Ok(_) => {}
            Err(err) => {
                s.fail(format!("watermarks of `{topic}` [{p}]: {err}"));
                return;
            }
        }
    }
    if pending.is_empty() {
        s.gate_caught_up.store(true, Ordering::SeqCst);
    }
    while !s.stop.load(Ordering::Relaxed) && !s.failed() {
        // Liveness for `/healthz` (a control thread that stops turning fails it).
        ev::ControlHeartbeat.emit(&s.metrics);
        let Some(polled) = consumer.poll(Duration::from_millis(100)) else { continue };
        let m = match polled {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(error = %e, "control consumer error (librdkafka retries)");
                continue;
            }
        };
        if !pending.is_empty() {
            let k = (m.topic().to_string(), m.partition());
            if pending.get(&k).is_some_and(|end| m.offset() + 1 >= *end) {
                pending.remove(&k);
                if pending.is_empty() {
                    s.gate_caught_up.store(true, Ordering::SeqCst);
                }
            }
        }
        let payload = m.payload().unwrap_or_default();
        if m.topic() == s.cfg.topics.alerts {
            // Alerts are written by the pipeline itself; one that does not parse is
            // not ours to judge (a newer version): skip it.
            if let Ok(a) = serde_json::from_slice::<Alert>(payload) {
                s.gate.lock().expect("gate lock").observe_alert(&a);
            }
            continue;
        }
        let parsed = parse_control::<Feedback>(m.payload(), "a feedback")
            .and_then(|f| if f.v == RESPONSE_VERSION { Ok(f) } else { Err(format!("feedback version {} unsupported", f.v)) })
            // Unsigned or wrongly signed feedback (with a feedback secret) is refused.
            .and_then(|f| s.gate.lock().expect("gate lock").observe_feedback(&f));
        match parsed {
            Ok(t) => {
                ev::ControlRecordRead { ack: false }.emit(&s.metrics);
                if let Some(t) = t {
                    ev::GateChanged { transition: &t }.emit(&s.metrics);
                }
            }
            Err(reason) => {
                let dl = s.control_dead_letter(&feedback_topic, m.partition(), m.offset(), m.key().map(<[u8]>::to_vec), m.payload().map(<[u8]>::to_vec), &reason);
                let group = AckGroup::new(1);
                kafka::send_all(&s.producer, &[dl], &group, &s.abort);
                if let Err(e) = group.wait(&s.abort) {
                    s.fail(format!("dead letter for feedback: {e}"));
                }
            }
        }
    }
}

pub mod build;
pub mod observer;
pub use observer::StateObserver;

#[cfg(test)]
mod fault_tests;
