//! Kafka plumbing: client configuration, topic set-up, acknowledgement tracking,
//! and the changelog reader that restores twins.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message, Offset, TopicPartitionList};

use crate::config::Config;
use crate::obs::events::{BrokersReachable, BrokersUnreachable, KafkaClientError, TopicCreated};
use crate::PipelineError;

/// Base client configuration: brokers plus `[kafka.properties]`.
pub fn base_client(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers);
    for (k, v) in &cfg.kafka.properties {
        c.set(k, v);
    }
    c
}

/// Consumer configuration of the pipeline's source. Offsets are stored by the
/// pipeline only after delivery (`enable.auto.offset.store=false`) and committed in
/// the background from that store.
pub fn consumer_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("partition.assignment.strategy", "range")
        // Consumer lag per partition for the metrics (librdkafka's statistics).
        .set("statistics.interval.ms", "1000");
    for (k, v) in cfg.kafka.properties.iter().chain(&cfg.kafka.consumer) {
        c.set(k, v);
    }
    c.set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        .set("isolation.level", "read_committed")
        .set(crate::config::MAX_POLL, cfg.max_poll_interval_ms().to_string());
    c
}

/// Producer configuration of the pipeline's sink: idempotent, `acks=all`, keys
/// hashed like the Java client, and gapless (`enable.gapless.guarantee`): a record
/// that fails for good makes the producer fail (a fatal error) before any later
/// record of the same partition can succeed, so an audit chain never gets a hole
/// after which it goes on. The same producer writes verdicts, alerts, changelog and
/// dead letters, whose delivery failures were already fatal to the pipeline (the
/// batch fails), so gapless changes nothing there but what gets written after.
pub fn producer_config(cfg: &Config) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("linger.ms", "5")
        .set("message.timeout.ms", crate::config::DEFAULT_MESSAGE_TIMEOUT_MS.to_string())
        .set("partitioner", "murmur2_random")
        .set("queue.buffering.max.messages", "200000");
    for (k, v) in cfg.kafka.properties.iter().chain(&cfg.kafka.producer) {
        c.set(k, v);
    }
    c.set("enable.idempotence", "true").set("acks", "all").set("enable.gapless.guarantee", "true");
    c
}

/// Counts outstanding deliveries of a group of records; `wait` returns once all were
/// acknowledged, or with the first delivery error.
#[derive(Debug)]
pub struct AckGroup {
    state: Mutex<(usize, Option<String>)>,
    cv: Condvar,
    /// A probe (one record) forwards its acknowledgement to the group it belongs to
    /// and remembers when it came (ms since the epoch; 0 = not yet).
    parent: Option<Arc<AckGroup>>,
    acked_at_ms: std::sync::atomic::AtomicI64,
}

impl AckGroup {
    pub fn new(pending: usize) -> Arc<Self> {
        Arc::new(AckGroup { state: Mutex::new((pending, None)), cv: Condvar::new(), parent: None, acked_at_ms: 0.into() })
    }
    /// A probe for one record of `parent`: pass it as the record's `probe`; the
    /// parent still counts the record.
    pub fn probe(parent: &Arc<AckGroup>) -> Arc<Self> {
        Arc::new(AckGroup { state: Mutex::new((1, None)), cv: Condvar::new(), parent: Some(parent.clone()), acked_at_ms: 0.into() })
    }
    /// When the probed record was acknowledged (ms since the epoch), if it was.
    pub fn acked_at_ms(&self) -> Option<i64> {
        Some(self.acked_at_ms.load(Ordering::SeqCst)).filter(|t| *t > 0)
    }
    pub fn ack(&self, error: Option<String>) {
        if let Some(p) = &self.parent {
            if error.is_none() {
                self.acked_at_ms.store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
            }
            p.ack(error.clone());
        }
        let mut s = self.state.lock().expect("ack lock");
        s.0 = s.0.saturating_sub(1);
        if s.1.is_none() {
            s.1 = error;
        }
        if s.0 == 0 || s.1.is_some() {
            self.cv.notify_all();
        }
    }
    /// Block until every record is acknowledged (Ok) or one failed (Err). Gives up
    /// with Err when `abort` is set.
    pub fn wait(&self, abort: &AtomicBool) -> Result<(), String> {
        let mut s = self.state.lock().expect("ack lock");
        loop {
            if let Some(e) = &s.1 {
                return Err(e.clone());
            }
            if s.0 == 0 {
                return Ok(());
            }
            if abort.load(Ordering::Relaxed) {
                return Err("aborted before acknowledgement".into());
            }
            s = self.cv.wait_timeout(s, Duration::from_millis(100)).expect("ack lock").0;
        }
    }
}

/// Producer context routing delivery reports to their [`AckGroup`].
pub struct SinkContext;

impl ClientContext for SinkContext {}

impl ProducerContext for SinkContext {
    type DeliveryOpaque = Arc<AckGroup>;
    fn delivery(&self, result: &DeliveryResult<'_>, group: Arc<AckGroup>) {
        group.ack(result.as_ref().err().map(|(e, m)| format!("delivery to {} failed: {e}", m.topic())));
    }
}

pub type SinkProducer = ThreadedProducer<SinkContext>;

pub fn create_producer(cfg: &Config) -> Result<SinkProducer, PipelineError> {
    producer_config(cfg).create_with_context(SinkContext).map_err(|e| PipelineError::kafka("create producer", e))
}

/// The producer for response commands: the sink's configuration, but it sends at
/// once (`linger.ms=0`). Commands are few and each one is on the response-time
/// path (event in → command acknowledged), so they are never held back to batch.
pub fn create_command_producer(cfg: &Config) -> Result<SinkProducer, PipelineError> {
    producer_config(cfg)
        .set("linger.ms", "0")
        .create_with_context(SinkContext)
        .map_err(|e| PipelineError::kafka("create command producer", e))
}

/// One record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: Arc<str>,
    pub partition: Option<i32>,
    pub key: Vec<u8>,
    /// `None` is a tombstone.
    pub payload: Option<Vec<u8>>,
    pub headers: Vec<(&'static str, Vec<u8>)>,
    /// Acknowledge through this probe (which forwards to the group) to learn when
    /// this record was acknowledged.
    pub probe: Option<Arc<AckGroup>>,
}

/// Hand every record to the producer, each acknowledged through `group` (which MUST
/// count `records.len()`). Waits while the producer queue is full (backpressure).
pub fn send_all(producer: &SinkProducer, records: &[OutRecord], group: &Arc<AckGroup>, abort: &AtomicBool) {
    for r in records {
        // Headers only where there are some (dead letters): an empty header list still
        // costs an allocation and a copy per record in librdkafka.
        let headers = (!r.headers.is_empty()).then(|| {
            r.headers.iter().fold(OwnedHeaders::new_with_capacity(r.headers.len()), |h, (k, v)| {
                h.insert(Header { key: k, value: Some(v.as_slice()) })
            })
        });
        loop {
            let mut rec = BaseRecord::with_opaque_to(&r.topic, r.probe.clone().unwrap_or_else(|| group.clone())).key(&r.key);
            if let Some(h) = &headers {
                rec = rec.headers(h.clone());
            }
            if let Some(p) = &r.payload {
                rec = rec.payload(p);
            }
            if let Some(p) = r.partition {
                rec = rec.partition(p);
            }
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) if !abort.load(Ordering::Relaxed) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    group.ack(Some(format!("cannot produce to {}: {e}", r.topic)));
                    break;
                }
            }
        }
    }
}

fn block_on<F: std::future::Future>(f: F) -> Result<F::Output, PipelineError> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| PipelineError::io("tokio runtime", e))?;
    Ok(rt.block_on(f))
}

/// Wait until the brokers answer a metadata request, as a Kafka Streams application
/// does at start: each failed try is logged (a WARN naming `kafka.brokers`) and
/// retried with a back-off of 1 s doubling to 30 s. `alive` runs at least once a
/// second (the caller's liveness heartbeat). Returns false if `stop` was set first.
pub fn wait_for_brokers(cfg: &Config, stop: &AtomicBool, mut alive: impl FnMut()) -> Result<bool, PipelineError> {
    let c: BaseConsumer = base_client(cfg).create().map_err(|e| PipelineError::kafka("metadata client", e))?;
    let started = Instant::now();
    let mut backoff = Duration::from_secs(1);
    for attempt in 1u64.. {
        alive();
        match c.fetch_metadata(None, Duration::from_secs(5)) {
            Ok(_) => {
                if attempt > 1 {
                    BrokersReachable { brokers: &cfg.kafka.brokers, waited_secs: started.elapsed().as_secs() }.emit();
                }
                return Ok(true);
            }
            Err(e) => BrokersUnreachable { brokers: &cfg.kafka.brokers, attempt, retry_in_secs: backoff.as_secs(), error: &e.to_string() }.emit(),
        }
        let until = Instant::now() + backoff;
        while Instant::now() < until {
            if stop.load(Ordering::Relaxed) {
                return Ok(false);
            }
            alive();
            std::thread::sleep(Duration::from_millis(100));
        }
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
    unreachable!("the attempt counter does not end")
}

/// Partition count of a topic, or None when it does not exist.
pub fn partition_count(cfg: &Config, topic: &str) -> Result<Option<usize>, PipelineError> {
    let c: BaseConsumer = base_client(cfg).create().map_err(|e| PipelineError::kafka("metadata client", e))?;
    let md = c.fetch_metadata(Some(topic), Duration::from_secs(10)).map_err(|e| PipelineError::kafka("fetch metadata", e))?;
    Ok(md.topics().iter().find(|t| t.name() == topic).and_then(|t| {
        (t.error().is_none() && !t.partitions().is_empty()).then(|| t.partitions().len())
    }))
}

/// Create missing topics (`topics.create`) and check the changelog is partitioned
/// like the input (its partition p holds the twins of input partition p).
pub fn ensure_topics(cfg: &Config) -> Result<usize, PipelineError> {
    let t = &cfg.topics;
    let mut input = partition_count(cfg, &t.input)?;
    let mut wanted: Vec<NewTopicSpec> = Vec::new();
    let n = input.unwrap_or(t.partitions as usize);
    if input.is_none() {
        if !t.create {
            return Err(PipelineError::config("topics.input", format!("topic `{}` does not exist", t.input)));
        }
        wanted.push(NewTopicSpec { name: t.input.clone(), partitions: n as i32, compact: false });
    }
    for (name, compact) in t.all().into_iter().skip(1) {
        match partition_count(cfg, name)? {
            Some(_) => {}
            None if t.create => wanted.push(NewTopicSpec { name: name.clone(), partitions: n as i32, compact }),
            None => return Err(PipelineError::config("topics.create", format!("topic `{name}` does not exist and `topics.create` is false"))),
        }
    }
    if !wanted.is_empty() {
        create_topics(cfg, &wanted)?;
        input = partition_count(cfg, &t.input)?;
    }
    let n = input.ok_or_else(|| PipelineError::config("topics.input", format!("topic `{}` has no partitions", t.input)))?;
    let cl = partition_count(cfg, &t.changelog)?.unwrap_or(0);
    if cl < n {
        return Err(PipelineError::config(
            "topics.changelog",
            format!("`{}` has {cl} partitions but `{}` has {n}; the changelog needs at least as many", t.changelog, t.input),
        ));
    }
    // Co-partitioned topics: partition p of each belongs with input partition p.
    for (key, name, exact) in [("topics.acks", &t.acks, true), ("topics.audit", &t.audit, false)] {
        let m = partition_count(cfg, name)?.unwrap_or(0);
        if m < n || (exact && m != n) {
            return Err(PipelineError::config(
                key,
                format!("`{name}` has {m} partitions but `{}` has {n}; it must have {} as many", t.input, if exact { "exactly" } else { "at least" }),
            ));
        }
    }
    Ok(n)
}

pub struct NewTopicSpec {
    pub name: String,
    pub partitions: i32,
    pub compact: bool,
}

/// Create topics; ones that already exist are fine.
pub fn create_topics(cfg: &Config, topics: &[NewTopicSpec]) -> Result<(), PipelineError> {
    let admin: AdminClient<DefaultClientContext> = base_client(cfg).create().map_err(|e| PipelineError::kafka("admin client", e))?;
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|s| {
            let t = NewTopic::new(&s.name, s.partitions, TopicReplication::Fixed(cfg.topics.replication));
            if s.compact {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let results = block_on(admin.create_topics(&new, &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)))))?
        .map_err(|e| PipelineError::kafka("create topics", e))?;
    for r in results {
        match r {
            Ok(name) => TopicCreated { topic: &name }.emit(),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => return Err(PipelineError::Broker(format!("cannot create topic `{name}`: {code}"))),
        }
    }
    // Metadata propagates asynchronously; wait until every topic is visible.
    let deadline = Instant::now() + Duration::from_secs(30);
    for s in topics {
        while partition_count(cfg, &s.name)?.is_none() {
            if Instant::now() > deadline {
                return Err(PipelineError::Broker(format!("topic `{}` did not appear after creation", s.name)));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    Ok(())
}

/// Context of the changelog reader: partition EOF is how a restore knows it is done,
/// not an error worth logging (librdkafka also reports it on the main queue).
pub struct RestoreContext;

impl ClientContext for RestoreContext {
    fn error(&self, error: KafkaError, reason: &str) {
        let eof = rdkafka::types::RDKafkaErrorCode::PartitionEOF;
        if !matches!(error, KafkaError::PartitionEOF(_)) && !matches!(error, KafkaError::Global(c) if c == eof) {
            KafkaClientError { client: "changelog reader", error: &format!("{error} ({reason})"), retried: false }.emit();
        }
    }
}

impl rdkafka::consumer::ConsumerContext for RestoreContext {}

/// Read changelog partitions from the beginning to their current end, calling `f`
/// for every record (partition, offset, key, value; `None` = tombstone). Returns
/// records read per partition. Fails after `timeout` with the partitions still
/// incomplete.
pub fn read_changelog_at(
    cfg: &Config,
    partitions: &[i32],
    timeout: Duration,
    mut f: impl FnMut(i32, i64, &str, Option<&[u8]>) -> Result<(), PipelineError>,
) -> Result<BTreeMap<i32, u64>, PipelineError> {
    read_partitions(cfg, &cfg.topics.changelog, partitions, |_| Offset::Beginning, timeout, |p, offset, key, value| {
        let key = key.map(String::from_utf8_lossy).unwrap_or_default();
        f(p, offset, &key, value)
    })
}

/// A consumer that reads by assignment, outside the pipeline's group: no commits,
/// no stored offsets; `purpose` names its group id.
pub fn reader_config(cfg: &Config, purpose: &str) -> ClientConfig {
    let mut c = base_client(cfg);
    for (k, v) in &cfg.kafka.consumer {
        c.set(k, v);
    }
    c.set("group.id", format!("{}.{purpose}", cfg.kafka.group_id))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("fetch.wait.max.ms", "50");
    c
}

/// Read `partitions` of `topic` from `start(p)` to their end (partition EOF), calling
/// `f(partition, offset, key, value)` per record; returns records read per partition.
pub fn read_partitions(
    cfg: &Config,
    topic: &str,
    partitions: &[i32],
    start: impl Fn(i32) -> Offset,
    timeout: Duration,
    mut f: impl FnMut(i32, i64, Option<&[u8]>, Option<&[u8]>) -> Result<(), PipelineError>,
) -> Result<BTreeMap<i32, u64>, PipelineError> {
    let mut read: BTreeMap<i32, u64> = partitions.iter().map(|p| (*p, 0)).collect();
    if partitions.is_empty() {
        return Ok(read);
    }
    let mut c = reader_config(cfg, "restore");
    c.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<RestoreContext> =
        c.create_with_context(RestoreContext).map_err(|e| PipelineError::kafka("reader", e))?;
    // Every partition is read until librdkafka reports its end (partition EOF).
    // Watermarks are not trusted for the end: tansu 0.6 was seen to report a high
    // watermark below records it then served, which would end a restore early.
    let mut pending: std::collections::BTreeSet<i32> = partitions.iter().copied().collect();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        tpl.add_partition_offset(topic, p, start(p)).map_err(|e| PipelineError::kafka("assign", e))?;
    }
    consumer.assign(&tpl).map_err(|e| PipelineError::kafka(&format!("assign `{topic}`"), e))?;
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        if Instant::now() > deadline {
            return Err(PipelineError::Broker(format!("reading `{topic}` timed out; partitions {pending:?} incomplete")));
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Err(KafkaError::PartitionEOF(p))) => {
                pending.remove(&p);
            }
            Some(Err(e)) => return Err(PipelineError::kafka(&format!("reading `{topic}`"), e)),
            Some(Ok(m)) => {
                let p = m.partition();
                f(p, m.offset(), m.key(), m.payload())?;
                *read.entry(p).or_default() += 1;
            }
        }
    }
    Ok(read)
}

/// Records before the high watermark [`read_tail`] starts reading at first.
const TAIL_WINDOW: i64 = 256;
/// How long [`read_tail`] waits for a window to deliver anything before widening it.
const TAIL_STEP: Duration = Duration::from_secs(2);

/// The last record of one partition (None when it is empty).
///
/// Reads a window before the high watermark to the partition's end (EOF) and keeps
/// the last record seen. A fetch that starts inside a stored batch is served from
/// the NEXT batch by tansu 0.6 (a Kafka broker returns the whole batch), so a window
/// starting inside the last batch delivers nothing and never reaches EOF: when a
/// window delivers nothing for a while, it is widened (×16) down to the low
/// watermark, which starts a batch. The whole read is bounded by `timeout`.
pub fn read_tail(cfg: &Config, topic: &str, partition: i32, timeout: Duration) -> Result<Option<Vec<u8>>, PipelineError> {
    let deadline = Instant::now() + timeout;
    let c: BaseConsumer = base_client(cfg).create().map_err(|e| PipelineError::kafka("watermark client", e))?;
    let (low, high) = c
        .fetch_watermarks(topic, partition, Duration::from_secs(10).min(timeout))
        .map_err(|e| PipelineError::kafka(&format!("watermarks of `{topic}` [{partition}]"), e))?;
    if high <= low {
        return Ok(None);
    }
    let mut rc = reader_config(cfg, "restore");
    rc.set("enable.partition.eof", "true");
    let consumer: BaseConsumer<RestoreContext> = rc.create_with_context(RestoreContext).map_err(|e| PipelineError::kafka("reader", e))?;
    let mut window = TAIL_WINDOW;
    loop {
        let start = (high - window).max(low);
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(start)).map_err(|e| PipelineError::kafka("assign", e))?;
        consumer.assign(&tpl).map_err(|e| PipelineError::kafka(&format!("assign `{topic}`"), e))?;
        // The widest window waits until the deadline; a narrower one for a step.
        let quiet_limit = if start == low { Duration::MAX } else { TAIL_STEP };
        let mut last: Option<(i64, Option<Vec<u8>>)> = None;
        let mut quiet_since = Instant::now();
        let done = loop {
            if Instant::now() > deadline {
                return Err(PipelineError::Broker(format!(
                    "reading the last record of `{topic}` [{partition}] (records {low}..{high}) timed out after {timeout:?}"
                )));
            }
            if last.is_none() && quiet_since.elapsed() > quiet_limit {
                break false;
            }
            match consumer.poll(Duration::from_millis(200)) {
                None => {}
                Some(Err(KafkaError::PartitionEOF(_))) => break true,
                Some(Err(e)) => return Err(PipelineError::kafka(&format!("reading `{topic}`"), e)),
                Some(Ok(m)) => {
                    last = Some((m.offset(), m.payload().map(<[u8]>::to_vec)));
                    quiet_since = Instant::now();
                }
            }
        };
        match last {
            Some((offset, Some(value))) if done && offset >= high - 1 => return Ok(Some(value)),
            Some((offset, _)) if done => {
                // Records exist but the last one was not read (or has no value):
                // continuing from it would fork the chain.
                return Err(PipelineError::Broker(format!(
                    "`{topic}` [{partition}] holds records {low}..{high} but its last one could not be read (the read ended at offset {offset})"
                )));
            }
            // Nothing delivered from the widest window: retention raced the read.
            _ if start == low => {
                return Err(PipelineError::Broker(format!("`{topic}` [{partition}] holds records {low}..{high} but none could be read")));
            }
            _ => window = window.saturating_mul(16),
        }
    }
}

/// Every record of every partition of `topic`, by partition, in offset order.
pub fn read_all(cfg: &Config, topic: &str, timeout: Duration) -> Result<BTreeMap<i32, Vec<(i64, Vec<u8>)>>, PipelineError> {
    let n = partition_count(cfg, topic)?.ok_or_else(|| PipelineError::Broker(format!("topic `{topic}` does not exist")))?;
    let parts: Vec<i32> = (0..n as i32).collect();
    let mut out: BTreeMap<i32, Vec<(i64, Vec<u8>)>> = parts.iter().map(|p| (*p, Vec::new())).collect();
    read_partitions(cfg, topic, &parts, |_| Offset::Beginning, timeout, |p, o, _, v| {
        out.entry(p).or_default().push((o, v.map(<[u8]>::to_vec).unwrap_or_default()));
        Ok(())
    })?;
    Ok(out)
}

/// A consumer assigned every partition of `topics` from the beginning (no group
/// membership, no commits): every instance reads all of them.
pub fn assign_all(cfg: &Config, topics: &[&str], purpose: &str) -> Result<BaseConsumer<RestoreContext>, PipelineError> {
    let consumer: BaseConsumer<RestoreContext> = reader_config(cfg, purpose)
        .create_with_context(RestoreContext)
        .map_err(|e| PipelineError::kafka(&format!("{purpose} consumer"), e))?;
    let mut tpl = TopicPartitionList::new();
    for t in topics {
        let n = partition_count(cfg, t)?.ok_or_else(|| PipelineError::Broker(format!("topic `{t}` does not exist")))?;
        for p in 0..n as i32 {
            tpl.add_partition_offset(t, p, Offset::Beginning).map_err(|e| PipelineError::kafka("assign", e))?;
        }
    }
    consumer.assign(&tpl).map_err(|e| PipelineError::kafka(&format!("assign {purpose}"), e))?;
    Ok(consumer)
}

/// Records between this consumer's position and the end of each of `parts` of
/// `topic` (asks the broker for the ends: a round trip per partition). Partitions
/// without a known position or end are left out.
pub fn lag<C: ConsumerContext>(consumer: &BaseConsumer<C>, topic: &str, parts: &[i32]) -> BTreeMap<i32, i64> {
    let Ok(pos) = consumer.position() else { return BTreeMap::new() };
    parts
        .iter()
        .filter_map(|&p| {
            let (_, high) = consumer.fetch_watermarks(topic, p, Duration::from_secs(2)).ok()?;
            let Offset::Offset(at) = pos.find_partition(topic, p)?.offset() else { return None };
            (high >= 0).then_some((p, (high - at).max(0)))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sink_producer_is_gapless_whatever_the_config_says() {
        let mut cfg = Config::default();
        cfg.kafka.producer.insert("enable.gapless.guarantee".into(), "false".into());
        cfg.kafka.properties.insert("enable.gapless.guarantee".into(), "false".into());
        let c = producer_config(&cfg);
        assert_eq!(c.get("enable.gapless.guarantee"), Some("true"));
        assert_eq!((c.get("enable.idempotence"), c.get("acks")), (Some("true"), Some("all")));
    }

    #[test]
    fn the_consumer_reads_committed_with_the_configured_poll_interval() {
        let c = Config::default();
        let props = consumer_config(&c);
        assert_eq!(props.get(crate::config::MAX_POLL), Some(c.max_poll_interval_ms().to_string().as_str()));
        assert_eq!(props.get("isolation.level"), Some("read_committed"));
    }
}
