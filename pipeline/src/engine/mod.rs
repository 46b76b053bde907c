//! The streaming spine: source → decode → twin update → verdicts/DLQ → sink, with
//! offsets stored only after every output derived from them is acknowledged.
//!
//! Threads (all owned and joined; the one exception is a close that outlives
//! `engine.close_timeout_secs`, see `close.rs`):
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
//!
//! Files: this one holds the shared state and [`run_with`]; `batch.rs` a batch
//! through the stages, `rebalance.rs` partitions coming and going (restore,
//! revoke), `loops.rs` the threads, `build.rs` the stages from a configuration,
//! `observer.rs` the outward hook, `seam.rs` the source and sink interfaces
//! (Kafka in production, fakes in `seam_tests.rs`).

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
use twinguard_schemas::{Decoder, EventSchema, RawRecord};

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
    /// when that event was consumed, and the probe that learns when the broker
    /// acknowledged the command (response time).
    commands: Vec<(Option<(i64, Instant)>, Arc<AckGroup>)>,
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
    /// Per owned partition, the model versions it scores with (`model.follow`).
    routes: HashMap<i32, swap::Route>,
    /// Published versions the detector refused (reported once).
    refused: BTreeSet<String>,
}

/// Check a consumed record's offset against the one expected next on its partition
/// and advance the expectation. Returns the gap (records skipped) or the rewind.
pub(crate) fn check_contiguity(expected: &mut HashMap<i32, i64>, partition: i32, offset: i64) -> Option<Result<i64, i64>> {
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
    producer: Arc<dyn RecordSink>,
    /// Commands go out on a producer of their own, so they do not queue behind the
    /// bulk of verdicts, audit and changelog records (response time).
    command_producer: Arc<dyn RecordSink>,
    to_changelog: Mutex<Option<SyncSender<Job>>>,
    /// Where leaving the group at the end of the run is (`close.rs`).
    closing: close::Closing,
    /// The SQL tables, when served: fed with twin rows and outputs.
    observer: Option<Arc<dyn StateObserver>>,
    /// Published model versions to switch to (`model.follow`).
    feed: Option<Arc<dyn ModelFeed>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        ev::PipelineFailing { reason: &msg }.emit(&self.metrics);
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

}

/// What a run ended with.
#[derive(Debug, Clone, Default)]
pub struct RunReport {
    pub twins: usize,
    pub twin_mem_bytes: usize,
    /// (twins whose desired state equals their reported state, twins with a desired state).
    pub reconciled: (usize, usize),
    /// Leaving the consumer group did not finish within `engine.close_timeout_secs`:
    /// the step it was stuck in (see `close.rs`). Outputs and offsets were stored
    /// before; the group notices the member gone after its session timeout.
    pub close_timed_out: Option<&'static str>,
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
pub fn run_rejoining(
    cfg: &Config,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    observer: Option<Arc<dyn StateObserver>>,
    feed: Option<Arc<dyn ModelFeed>>,
) -> Result<RunReport, PipelineError> {
    loop {
        match run_following(cfg, metrics.clone(), stop.clone(), observer.clone(), feed.clone()) {
            Err(PipelineError::AssignmentLost(why)) if !stop.load(Ordering::Relaxed) => {
                ev::GroupRejoining { reason: &why }.emit(&metrics);
                std::thread::sleep(Duration::from_secs(1));
            }
            other => return other,
        }
    }
}

/// [`run_rejoining`] on `engine.workers` stream workers (threads `tg-worker-N`),
/// like Kafka Streams' `num.stream.threads`: each is its own group member with its
/// own consumer, producers, batches, twins, detector and commit stages, so the
/// group spreads the partitions over them and every per-partition invariant holds
/// as it does between instances. They share the metrics (counters summed, gauges
/// combined per worker), the SQL view and the model feed. The first worker to fail
/// stops the others (gracefully: they flush and commit); its error is the result.
pub fn run_workers(
    cfg: &Config,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    observer: Option<Arc<dyn StateObserver>>,
    feed: Option<Arc<dyn ModelFeed>>,
) -> Result<RunReport, PipelineError> {
    let n = cfg.engine.workers();
    metrics.expect_workers(n);
    if n == 1 {
        return run_rejoining(cfg, metrics, stop, observer, feed);
    }
    ev::WorkersStarting { workers: n }.emit();
    let handles = (0..n)
        .map(|id| {
            let (cfg, metrics, stop, observer, feed) = (cfg.clone(), metrics.clone(), stop.clone(), observer.clone(), feed.clone());
            std::thread::Builder::new()
                .name(format!("tg-worker-{id}"))
                .spawn(move || {
                    crate::obs::set_worker(id);
                    let _span = tracing::info_span!("worker", id).entered();
                    let r = run_rejoining(&cfg, metrics, stop.clone(), observer, feed);
                    if r.is_err() {
                        stop.store(true, Ordering::SeqCst);
                    }
                    r
                })
                .map_err(|e| PipelineError::io("starting a stream worker", e))
        })
        .collect::<Result<Vec<_>, _>>();
    let handles = match handles {
        Ok(h) => h,
        Err(e) => {
            stop.store(true, Ordering::SeqCst);
            return Err(e);
        }
    };
    let mut total = RunReport::default();
    let mut first_err = None;
    for h in handles {
        match h.join().unwrap_or_else(|_| Err(PipelineError::Fatal("a stream worker panicked".into()))) {
            Ok(r) => {
                total.twins += r.twins;
                total.twin_mem_bytes += r.twin_mem_bytes;
                total.reconciled.0 += r.reconciled.0;
                total.reconciled.1 += r.reconciled.1;
                total.close_timed_out = total.close_timed_out.or(r.close_timed_out);
            }
            Err(e) => {
                stop.store(true, Ordering::SeqCst);
                first_err.get_or_insert(e);
            }
        }
    }
    first_err.map_or(Ok(total), Err)
}

/// [`run`], also telling `observer` (the SQL view) about this instance's twins and outputs.
pub fn run_with(cfg: &Config, metrics: Arc<Metrics>, stop: Arc<AtomicBool>, observer: Option<Arc<dyn StateObserver>>) -> Result<RunReport, PipelineError> {
    run_following(cfg, metrics, stop, observer, None)
}

/// [`run_with`], switching each partition to the model versions `feed` publishes
/// (see `swap.rs`).
pub fn run_following(
    cfg: &Config,
    metrics: Arc<Metrics>,
    stop: Arc<AtomicBool>,
    observer: Option<Arc<dyn StateObserver>>,
    feed: Option<Arc<dyn ModelFeed>>,
) -> Result<RunReport, PipelineError> {
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
    let producer = Arc::new(kafka::create_producer(cfg)?);
    let command_producer = Arc::new(kafka::create_command_producer(cfg)?);
    let (shared, rx_cl) = Shared::new(cfg, &schema, detector, responder, metrics.clone(), stop.clone(), (observer, feed), producer, command_producer)?;
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
        ev::StartsSuspended.emit();
    }

    let source = Arc::new(KafkaSource { consumer: consumer.clone(), input: cfg.topics.input.clone(), acks: cfg.topics.acks.clone() });
    drive(&shared, rx_cl, source)?;
    let _ = control.join();
    let mut report = shared.report();
    close::leave_group(&shared, consumer, &mut report);
    shared.outcome()?;
    Ok(report)
}

impl Shared {
    /// The engine's state for `cfg` reading `schema`, writing to `producer`
    /// (commands to `command_producer`), telling the observer (SQL view) and
    /// following the model feed when given, with the receiving end of the first
    /// commit stage.
    #[allow(clippy::too_many_arguments)]
    fn new(
        cfg: &Config,
        schema: &EventSchema,
        detector: Detector,
        responder: Responder,
        metrics: Arc<Metrics>,
        stop: Arc<AtomicBool>,
        (observer, feed): (Option<Arc<dyn StateObserver>>, Option<Arc<dyn ModelFeed>>),
        producer: Arc<dyn RecordSink>,
        command_producer: Arc<dyn RecordSink>,
    ) -> Result<(Arc<Shared>, Receiver<Job>), PipelineError> {
        let (tx_cl, rx_cl) = sync_channel::<Job>(cfg.batch.max_inflight_batches);
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
            metrics,
            stop,
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
                routes: HashMap::new(),
                refused: BTreeSet::new(),
            }),
            producer,
            command_producer,
            to_changelog: Mutex::new(Some(tx_cl)),
            closing: close::Closing::default(),
            observer,
            feed,
        });
        Ok((shared, rx_cl))
    }

    /// What the twins came to (for [`RunReport`]).
    fn report(&self) -> RunReport {
        let core = self.core.lock().expect("core lock");
        let commanded: Vec<_> = core.op.twin().store().iter().filter(|t| !t.response().desired.is_empty()).collect();
        RunReport {
            twins: core.op.twin().store().len(),
            twin_mem_bytes: core.op.twin().store().mem_bytes(),
            reconciled: (commanded.iter().filter(|t| t.response().delta().is_empty()).count(), commanded.len()),
            close_timed_out: None,
        }
    }

    /// The run's first fatal error, typed: a lost assignment (the caller may
    /// rejoin) or anything else.
    fn outcome(&self) -> Result<(), PipelineError> {
        match self.fatal.lock().expect("fatal lock").clone() {
            None => Ok(()),
            Some(msg) if self.lost.load(Ordering::SeqCst) => Err(PipelineError::AssignmentLost(msg)),
            Some(msg) => Err(PipelineError::Fatal(msg)),
        }
    }
}

/// Run the spine on `source` until stop or failure: the changelog and offsets
/// stages on their threads, the core loop on this one, then a graceful flush
/// (unless failed) and both stages drained in order. Failures are recorded in
/// `shared` (see [`Shared::fail`]); the caller reads them.
fn drive(shared: &Arc<Shared>, rx_cl: Receiver<Job>, source: Arc<dyn RecordSource>) -> Result<(), PipelineError> {
    let (tx_off, rx_off) = sync_channel::<(Job, Arc<AckGroup>)>(shared.cfg.batch.max_inflight_batches);
    let changelog_stage = {
        let s = shared.clone();
        std::thread::Builder::new()
            .name("tg-changelog".into())
            .spawn(move || changelog_stage(&s, rx_cl, tx_off))
            .map_err(|e| PipelineError::io("starting the changelog thread", e))?
    };
    let offsets_stage = {
        let s = shared.clone();
        let src = source.clone();
        std::thread::Builder::new()
            .name("tg-offsets".into())
            .spawn(move || offsets_stage(&s, &*src, rx_off))
            .map_err(|e| PipelineError::io("starting the offsets thread", e))?
    };
    let result = core_loop(shared, &*source);
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
    Ok(())
}

mod batch;
pub mod build;
mod close;
mod loops;
pub mod observer;
mod rebalance;
mod seam;
pub mod swap;

use batch::*;
use loops::*;
use seam::*;
pub use observer::StateObserver;
pub use swap::{ModelFeed, Published, ACTIVATIONS_KEY};
pub use rebalance::{restore_verdict, Restore, SourceContext, QUARANTINED_CHANGELOG};

#[cfg(test)]
mod fault_tests;
#[cfg(test)]
mod seam_tests;
