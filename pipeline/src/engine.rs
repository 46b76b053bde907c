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
use twinguard_operators::{ChangelogRecord, Detector};
use twinguard_schemas::verdict::verdicts_from_batch;
use twinguard_schemas::{fields, Decoder, RawRecord};

use crate::config::Config;
use crate::kafka::{self, AckGroup, OutRecord, SinkProducer};
use crate::telemetry::{self as ev, Metrics};
use crate::PipelineError;

/// Budget of a dead letter (key + headers + value), below librdkafka's default
/// `message.max.bytes` (1,000,000); longer originals are truncated (and marked).
const MAX_DLQ_VALUE: usize = 900 * 1024;
/// Longest key kept in a dead letter.
const MAX_DLQ_KEY: usize = 16 * 1024;

/// Owned copy of a consumed record.
struct Rec {
    offset: i64,
    key: Option<Vec<u8>>,
    payload: Option<Vec<u8>>,
}

struct PartBuf {
    records: Vec<Rec>,
    opened: Instant,
}

/// A processed batch on its way through the commit stages.
struct Job {
    partition: Option<i32>,
    next_offset: Option<i64>,
    phase1: Arc<AckGroup>,
    changelog: Vec<ChangelogRecord>,
}

/// State touched by the core loop and the rebalance callbacks (same thread; the
/// mutex is never contended, it only makes the sharing explicit and safe).
struct Core {
    op: Detector,
    decoder: Decoder,
    buffers: BTreeMap<i32, PartBuf>,
    owned: BTreeSet<i32>,
}

struct Shared {
    cfg: Config,
    verdicts_topic: Arc<str>,
    dlq_topic: Arc<str>,
    schema_id: String,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    /// Set on an unrecoverable error; stops everything without storing offsets.
    abort: AtomicBool,
    fatal: Mutex<Option<String>>,
    inflight: Mutex<HashMap<i32, usize>>,
    inflight_cv: Condvar,
    /// Committed input offsets (next record to read) per partition, as acknowledged
    /// by the group coordinator: what a restart would resume from.
    committed: Mutex<HashMap<i32, i64>>,
    core: Mutex<Core>,
    producer: SinkProducer,
    to_changelog: Mutex<Option<SyncSender<Job>>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        tracing::error!(error = %msg, "pipeline failing");
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
        let raw: Vec<RawRecord<'_>> = recs
            .iter()
            .map(|r| RawRecord { partition, offset: r.offset, key: r.key.as_deref(), payload: r.payload.as_deref() })
            .collect();
        let now = chrono::Utc::now().timestamp_millis();
        let decoded = core.decoder.decode(&raw, now)?;
        let valid = decoded.batch.num_rows();
        let mut outputs: Vec<OutRecord> = Vec::with_capacity(valid + decoded.rejects.len());
        for rej in &decoded.rejects {
            let r = &recs[rej.index];
            ev::RecordRejected { partition, offset: r.offset, code: rej.code, reason: &rej.reason }.emit(&self.metrics);
            let mut payload = r.payload.clone().unwrap_or_default();
            let mut key = r.key.clone().unwrap_or_default();
            let mut headers = vec![
                (fields::DLQ_REASON, rej.reason.clone().into_bytes()),
                (fields::DLQ_CODE, rej.code.as_str().as_bytes().to_vec()),
                (fields::DLQ_TOPIC, self.cfg.topics.input.clone().into_bytes()),
                (fields::DLQ_PARTITION, partition.to_string().into_bytes()),
                (fields::DLQ_OFFSET, r.offset.to_string().into_bytes()),
                (fields::DLQ_SCHEMA, self.schema_id.clone().into_bytes()),
            ];
            // A dead letter must fit the broker's message size, whatever the input's
            // key and value: an unsendable dead letter would stop the pipeline.
            if key.len() > MAX_DLQ_KEY {
                headers.push((fields::DLQ_TRUNCATED_KEY, key.len().to_string().into_bytes()));
                key.truncate(MAX_DLQ_KEY);
            }
            let budget = MAX_DLQ_VALUE - key.len() - headers.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>();
            if payload.len() > budget {
                headers.push((fields::DLQ_TRUNCATED, payload.len().to_string().into_bytes()));
                payload.truncate(budget);
            }
            outputs.push(OutRecord {
                topic: self.dlq_topic.clone(),
                partition: None,
                key,
                payload: Some(payload),
                headers,
            });
        }
        let skipped_before = core.op.twin().skipped();
        let (scored, _) = core.op.detect(&decoded.batch)?;
        let batches = [scored];
        let mut verdicts = 0;
        let mut anomalies = 0;
        for b in &batches {
            for v in verdicts_from_batch(b, &self.cfg.topics.input) {
                verdicts += 1;
                anomalies += usize::from(v.anomalous);
                outputs.push(OutRecord {
                    topic: self.verdicts_topic.clone(),
                    partition: None,
                    key: v.device_id.clone().into_bytes(),
                    payload: Some(serde_json::to_vec(&v).expect("verdict serialises")),
                    headers: Vec::new(),
                });
            }
        }
        ev::BatchProcessed {
            partition,
            records: recs.len(),
            valid,
            verdicts,
            anomalies,
            skipped: core.op.twin().skipped() - skipped_before,
        }
        .emit(&self.metrics);
        let changelog = core.op.twin_mut().drain_changelog();
        // Twin count per batch (O(partitions)); memory is sampled at expiry ticks (O(twins)).
        self.metrics.twins.store(core.op.twin().store().len() as i64, Ordering::Relaxed);
        self.dispatch(Some(partition), Some(last + 1), outputs, changelog)
    }

    fn dispatch(
        &self,
        partition: Option<i32>,
        next_offset: Option<i64>,
        outputs: Vec<OutRecord>,
        changelog: Vec<ChangelogRecord>,
    ) -> Result<(), PipelineError> {
        let phase1 = AckGroup::new(outputs.len());
        if let Some(p) = partition {
            self.inflight_add(p);
        }
        kafka::send_all(&self.producer, &outputs, &phase1, &self.abort);
        let tx = self.to_changelog.lock().expect("sender lock").clone();
        let job = Job { partition, next_offset, phase1, changelog };
        match tx.map(|tx| tx.send(job)) {
            Some(Ok(())) => Ok(()),
            _ => {
                if let Some(p) = partition {
                    self.inflight_done(p);
                }
                Err(PipelineError::Io("commit stages have stopped".into()))
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

    fn restore(&self, core: &mut Core, parts: &[i32]) -> Result<(), PipelineError> {
        let started = Instant::now();
        let timeout = Duration::from_secs(self.cfg.batch.restore_timeout_secs);
        for &p in parts {
            core.op.twin_mut().store_mut().drop_partition(p);
            core.op.twin_mut().store_mut().ensure_partition(p);
        }
        let op = &mut core.op;
        let read = kafka::read_changelog(&self.cfg, parts, timeout, |p, key, value| {
            op.twin_mut().restore_record(p, key, value).map_err(PipelineError::from)
        })?;
        for (p, n) in read {
            let twins = core.op.twin().store().iter().filter(|t| t.partition == p).count();
            ev::TwinsRestored { partition: p, twins, records_read: n, millis: started.elapsed().as_millis() }.emit(&self.metrics);
        }
        Ok(())
    }
}

/// Consumer context: runs the rebalance protocol of the spine.
pub struct SourceContext {
    shared: Arc<Shared>,
}

impl ClientContext for SourceContext {}

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
        if !lost {
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
            core.owned.remove(p);
            core.op.twin_mut().store_mut().drop_partition(*p);
            s.committed.lock().expect("committed lock").remove(p);
        }
        s.metrics.partitions_owned.store(core.owned.len() as i64, Ordering::Relaxed);
        s.metrics.ready.store(0, Ordering::Relaxed);
    }

    /// Remember what the coordinator acknowledged: idle expiry only removes twins
    /// whose events lie below these offsets.
    fn commit_callback(&self, result: rdkafka::error::KafkaResult<()>, offsets: &TopicPartitionList) {
        if result.is_err() {
            return;
        }
        let mut c = self.shared.committed.lock().expect("committed lock");
        for e in offsets.elements_for_topic(&self.shared.cfg.topics.input) {
            if let rdkafka::Offset::Offset(o) = e.offset() {
                c.insert(e.partition(), o);
            }
        }
    }

    /// Assign: restore the twins of newly owned partitions from the changelog before
    /// any of their records is processed.
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
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
        if let Err(e) = s.restore(&mut core, &fresh) {
            s.fail(format!("restoring twins of partitions {fresh:?}: {e}"));
            return;
        }
        core.owned.extend(parts.iter().copied());
        s.metrics.partitions_owned.store(core.owned.len() as i64, Ordering::Relaxed);
        s.metrics.twins.store(core.op.twin().store().len() as i64, Ordering::Relaxed);
        s.metrics.ready.store(1, Ordering::Relaxed);
    }
}

/// What a run ended with.
#[derive(Debug, Clone)]
pub struct RunReport {
    pub twins: usize,
    pub twin_mem_bytes: usize,
}

/// Run the pipeline until `stop` is set (graceful: buffered records are processed,
/// outputs acknowledged, offsets committed) or a fatal error occurs (no offsets are
/// stored past the failure; a restart replays from the last committed position).
pub fn run(cfg: &Config, metrics: Arc<Metrics>, stop: Arc<AtomicBool>) -> Result<RunReport, PipelineError> {
    let schema = cfg.event_schema()?;
    let detector = cfg.detector(&schema)?;
    let partitions = kafka::ensure_topics(cfg)?;
    tracing::info!(input = %cfg.topics.input, partitions, schema = %schema.id(), model = detector.model_version().unwrap_or("none (twin behaviour only)"), "starting pipeline");
    let producer = kafka::create_producer(cfg)?;
    let (tx_cl, rx_cl) = sync_channel::<Job>(cfg.batch.max_inflight_batches);
    let (tx_off, rx_off) = sync_channel::<(Job, Arc<AckGroup>)>(cfg.batch.max_inflight_batches);
    let shared = Arc::new(Shared {
        cfg: cfg.clone(),
        verdicts_topic: cfg.topics.verdicts.as_str().into(),
        dlq_topic: cfg.topics.dlq.as_str().into(),
        schema_id: schema.id(),
        metrics: metrics.clone(),
        stop: stop.clone(),
        abort: AtomicBool::new(false),
        fatal: Mutex::new(None),
        inflight: Mutex::new(HashMap::new()),
        inflight_cv: Condvar::new(),
        committed: Mutex::new(HashMap::new()),
        core: Mutex::new(Core {
            op: detector,
            decoder: Decoder::new(schema.clone(), cfg.decode_limits()),
            buffers: BTreeMap::new(),
            owned: BTreeSet::new(),
        }),
        producer,
        to_changelog: Mutex::new(Some(tx_cl)),
    });
    let consumer: Arc<BaseConsumer<SourceContext>> = Arc::new(
        kafka::consumer_config(cfg)
            .create_with_context(SourceContext { shared: shared.clone() })
            .map_err(|e| PipelineError::kafka("create consumer", e))?,
    );
    consumer.subscribe(&[&cfg.topics.input]).map_err(|e| PipelineError::kafka("subscribe", e))?;

    let changelog_stage = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("tg-changelog".into())
            .spawn(move || changelog_stage(&s, rx_cl, tx_off))
            .map_err(|e| PipelineError::Io(e.to_string()))?
    };
    let offsets_stage = {
        let s = shared.clone();
        let c = consumer.clone();
        std::thread::Builder::new()
            .name("tg-offsets".into())
            .spawn(move || offsets_stage(&s, &c, rx_off))
            .map_err(|e| PipelineError::Io(e.to_string()))?
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
    if !shared.failed() {
        match consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) | Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) => {}
            Err(e) => tracing::warn!(error = %e, "final commit failed"),
        }
    }
    consumer.unsubscribe();
    let report = {
        let core = shared.core.lock().expect("core lock");
        RunReport { twins: core.op.twin().store().len(), twin_mem_bytes: core.op.twin().store().mem_bytes() }
    };
    drop(consumer);
    if let Some(msg) = shared.fatal.lock().expect("fatal lock").clone() {
        return Err(PipelineError::Fatal(msg));
    }
    Ok(report)
}

fn core_loop(s: &Arc<Shared>, consumer: &BaseConsumer<SourceContext>) -> Result<(), PipelineError> {
    let linger = Duration::from_millis(s.cfg.batch.max_linger_ms);
    let max = s.cfg.batch.max_records;
    let expiry_every = Duration::from_secs(s.cfg.batch.expiry_interval_secs.max(1));
    let mut last_expiry = Instant::now();
    let input = s.cfg.topics.input.clone();
    while !s.stop.load(Ordering::Relaxed) && !s.failed() {
        let timeout = {
            let core = s.core.lock().expect("core lock");
            core.buffers.values().map(|b| linger.saturating_sub(b.opened.elapsed())).min().unwrap_or(Duration::from_millis(100))
        };
        let polled = consumer.poll(timeout.max(Duration::from_millis(1)));
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
                let buf = core.buffers.entry(p).or_insert_with(|| PartBuf { records: Vec::with_capacity(max), opened: Instant::now() });
                buf.records.push(Rec { offset: m.offset(), key: m.key().map(<[u8]>::to_vec), payload: m.payload().map(<[u8]>::to_vec) });
                if buf.records.len() >= max {
                    let recs = core.buffers.remove(&p).map(|b| b.records).unwrap_or_default();
                    s.process(&mut core, p, recs)?;
                }
            }
            Some(Ok(m)) => tracing::warn!(topic = m.topic(), "record from an unexpected topic ignored"),
        }
        let due: Vec<i32> = core.buffers.iter().filter(|(_, b)| b.opened.elapsed() >= linger).map(|(p, _)| *p).collect();
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
            let expired = core.op.twin_mut().expire(&durable);
            ev::StateSampled { twins: core.op.twin().store().len(), mem_bytes: core.op.twin().store().mem_bytes(), expired }.emit(&s.metrics);
            if expired > 0 {
                // One job per partition, counted in flight like a batch, so a revoke
                // waits for its tombstones too.
                let mut by_partition: BTreeMap<i32, Vec<ChangelogRecord>> = BTreeMap::new();
                for rec in core.op.twin_mut().drain_changelog() {
                    by_partition.entry(rec.partition).or_default().push(rec);
                }
                for (p, recs) in by_partition {
                    s.dispatch(Some(p), None, Vec::new(), recs)?;
                }
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
        let records: Vec<OutRecord> = job
            .changelog
            .iter()
            .map(|c| OutRecord {
                topic: topic.clone(),
                partition: Some(c.partition),
                key: c.key.clone().into_bytes(),
                payload: c.value.clone(),
                headers: Vec::new(),
            })
            .collect();
        let group = AckGroup::new(records.len());
        kafka::send_all(&s.producer, &records, &group, &s.abort);
        s.metrics.changelog_out.fetch_add(records.len() as u64, Ordering::Relaxed);
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
            match consumer.store_offset(&s.cfg.topics.input, p, next - 1) {
                Ok(()) => ev::OffsetsStored { partition: p, next_offset: next }.emit(&s.metrics),
                Err(e) => tracing::warn!(partition = p, error = %e, "cannot store offset (partition revoked?)"),
            }
        }
        if let Some(p) = job.partition {
            s.inflight_done(p);
        }
    }
}
