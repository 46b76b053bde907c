//! `twinguard sql`: a query-only process for the whole fleet. It owns no partition
//! and writes nothing: it reads EVERY partition of the compacted changelog topic
//! (the twins of all instances), and the newest records of the verdicts, alerts and
//! commands topics, into the same [`SqlView`] an instance serves for its own twins.

use std::collections::{BTreeMap, HashSet};
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Message, Offset, TopicPartitionList};
use twinguard_operators::Twin;
use twinguard_schemas::respond::{Alert, Command};
use twinguard_schemas::verdict::Verdict;

use crate::config::Config;
use crate::kafka::{self, RestoreContext};
use crate::sql::view::{RowMaker, SqlView, StagedTwin};
use crate::obs::events as ev;
use crate::obs::Metrics;
use crate::PipelineError;

/// Staged changes are handed to the view at least this often.
const HAND_OVER: Duration = Duration::from_millis(50);

/// librdkafka's prefetch for the reader, unless `kafka.consumer` sets it: records
/// fetched ahead of the view are memory too (librdkafka's defaults allow 64 MiB
/// queued plus 50 MiB per fetch), and a reader that materialises the fleet gains
/// nothing from more than a few MiB ahead.
const PREFETCH: [(&str, &str); 2] = [("queued.max.messages.kbytes", "16384"), ("fetch.max.bytes", "16777216")];

/// The devices that have a twin, as 64-bit hashes of their keys: only counted
/// (`metrics.twins`), so 8 bytes a twin instead of a copy of every key.
type Live = HashSet<u64, BuildHasherDefault<NoHash>>;

fn key_hash(key: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(key)
}

/// The hasher of [`Live`]: its keys are hashes already.
#[derive(Default)]
struct NoHash(u64);

impl std::hash::Hasher for NoHash {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// What one changelog record does to the fleet's twins.
enum Change {
    /// The device's twin, as its row.
    Upsert(StagedTwin),
    /// No twin: a tombstone (`None`), or a record the restore rule quarantines
    /// (`Some(reason)`: counted and logged here; the owning instance dead-letters it).
    Remove(Option<String>),
    /// A twin of a format this reader does not know.
    Unsupported,
    /// Not a twin: a partition's model activations (`model.follow`).
    NotATwin,
}

/// One changelog record through the pipeline's restore rule
/// ([`crate::engine::restore_verdict`]).
fn changelog_change(key: &str, value: Option<&[u8]>, max_twin_bytes: usize, rows: &RowMaker) -> Change {
    if key == crate::engine::ACTIVATIONS_KEY {
        return Change::NotATwin;
    }
    let Some(v) = value else { return Change::Remove(None) };
    let mut decoded = None;
    let verdict = crate::engine::restore_verdict(key, Some(v), max_twin_bytes, |k, v| {
        decoded = Some(Twin::decode(k, v.unwrap_or_default())?);
        Ok(())
    });
    match (verdict, decoded) {
        (crate::engine::Restore::Done, Some(twin)) => Change::Upsert(rows.row(&twin).into()),
        (crate::engine::Restore::Quarantine(reason), _) => Change::Remove(Some(reason)),
        (_, _) => Change::Unsupported,
    }
}

/// Assign the reader (the changelog from its beginning, the output topics from
/// their newest records). Returns the changelog's partitions and, for those not
/// empty, the end each had at start: the reader is caught up once it has read
/// them all to there.
fn assign_reader(cfg: &Config, consumer: &BaseConsumer<RestoreContext>) -> Result<(Vec<i32>, BTreeMap<i32, i64>), PipelineError> {
    let mut tpl = TopicPartitionList::new();
    let mut changelog_parts = Vec::new();
    for topic in [&cfg.topics.changelog, &cfg.topics.verdicts, &cfg.topics.alerts, &cfg.topics.commands] {
        let n = kafka::partition_count(cfg, topic)?
            .ok_or_else(|| PipelineError::Broker(format!("topic `{topic}` does not exist: start the pipeline (or create the topics) first")))?;
        // The output windows start at each partition's newest records, their share of
        // `recent_rows`; the changelog from its beginning.
        let tail = i64::try_from(cfg.sql.recent_rows.div_ceil(n.max(1))).unwrap_or(i64::MAX);
        let start = if topic == &cfg.topics.changelog { Offset::Beginning } else { Offset::OffsetTail(tail) };
        for p in 0..n as i32 {
            tpl.add_partition_offset(topic, p, start).map_err(|e| PipelineError::kafka("assign", e))?;
            if topic == &cfg.topics.changelog {
                changelog_parts.push(p);
            }
        }
    }
    consumer.assign(&tpl).map_err(|e| PipelineError::kafka("assign the sql reader", e))?;
    // Caught up once every changelog partition was read to the end it had at start.
    let mut behind: BTreeMap<i32, i64> = BTreeMap::new();
    for &p in &changelog_parts {
        let (low, high) = consumer
            .fetch_watermarks(&cfg.topics.changelog, p, Duration::from_secs(10))
            .map_err(|e| PipelineError::kafka(&format!("watermarks of `{}` [{p}]", cfg.topics.changelog), e))?;
        if high > low {
            behind.insert(p, high);
        }
    }
    Ok((changelog_parts, behind))
}

/// Read until `stop`: the changelog from the beginning, the output topics from their
/// newest records (`sql.recent_rows` spread over the partitions). `metrics.ready` turns 1 once every
/// changelog partition was read up to the end it had at start.
pub fn run(cfg: &Config, metrics: Arc<Metrics>, view: Arc<SqlView>, stop: Arc<AtomicBool>) -> Result<(), PipelineError> {
    let schema = cfg.event_schema()?;
    let rows = RowMaker::new(&schema, cfg.sql.expose_phi);
    let t = &cfg.topics;
    let mut reader = kafka::reader_config(cfg, "sql");
    for (k, v) in PREFETCH {
        if !cfg.kafka.consumer.contains_key(k) && !cfg.kafka.properties.contains_key(k) {
            reader.set(k, v);
        }
    }
    let consumer: BaseConsumer<RestoreContext> = reader
        .create_with_context(RestoreContext)
        .map_err(|e| PipelineError::kafka("sql reader", e))?;
    let (changelog_parts, mut behind) = assign_reader(cfg, &consumer)?;
    ev::FleetReading { changelog: &t.changelog, partitions: &changelog_parts, schema: &schema.id(), stall_limit_ms: 60_000 }.emit(&metrics);
    if behind.is_empty() {
        ev::FleetReady { twins: 0, millis: None, view_rows: 0, view_bytes: 0 }.emit(&metrics);
    }
    let started = Instant::now();
    let mut live = Live::default();
    let mut twins: Vec<(String, Option<StagedTwin>)> = Vec::new();
    let (mut verdicts, mut alerts, mut commands) = (Vec::<Verdict>::new(), Vec::<Alert>::new(), Vec::<Command>::new());
    let mut oldest: Option<Instant> = None;
    let mut last_handover = Instant::now();
    let mut last_lag = Instant::now();
    // Set when the last changelog record of the start was read; then the generation
    // of the view's first snapshot that shows every twin read by then.
    let (mut force_handover, mut shown_at) = (false, None::<u64>);
    while !stop.load(Relaxed) {
        ev::Heartbeat.emit(&metrics);
        match consumer.poll(Duration::from_millis(20)) {
            None => {}
            Some(Err(e)) => ev::KafkaClientError { client: "sql reader", error: &e.to_string(), retried: true }.emit(),
            Some(Ok(m)) => {
                oldest.get_or_insert_with(Instant::now);
                let (topic, p, offset) = (m.topic(), m.partition(), m.offset());
                let bad = |what: &str, e: &dyn std::fmt::Display| {
                    ev::FleetRecordSkipped { topic, partition: p, offset, what, error: &e.to_string() }.emit(&metrics);
                };
                if topic == t.changelog {
                    ev::ChangelogRead { records: 1 }.emit(&metrics);
                    let key = m.key().map(String::from_utf8_lossy).unwrap_or_default().into_owned();
                    match changelog_change(&key, m.payload(), cfg.state.max_twin_bytes, &rows) {
                        Change::Upsert(row) => {
                            live.insert(key_hash(&key));
                            twins.push((key, Some(row)));
                        }
                        Change::Remove(quarantined) => {
                            if let Some(reason) = quarantined {
                                ev::ChangelogQuarantined { partition: p, offset, key: &key, reason: &reason }.emit(&metrics);
                            }
                            live.remove(&key_hash(&key));
                            twins.push((key, None));
                        }
                        Change::Unsupported => bad("twin", &"unsupported twin format version"),
                        Change::NotATwin => {}
                    }
                    if behind.get(&p).is_some_and(|end| offset + 1 >= *end) {
                        behind.remove(&p);
                        if behind.is_empty() {
                            // Every twin read: hand them over now, and be ready once a
                            // snapshot shows them (the refresh under way when they are
                            // staged may have taken its changes before; the next has them).
                            force_handover = true;
                        }
                    }
                } else if topic == t.verdicts {
                    match serde_json::from_slice::<Verdict>(m.payload().unwrap_or_default()) {
                        Ok(v) => verdicts.push(v),
                        Err(e) => bad("verdict", &e),
                    }
                } else if topic == t.alerts {
                    match serde_json::from_slice::<Alert>(m.payload().unwrap_or_default()) {
                        Ok(a) => alerts.push(a),
                        Err(e) => bad("alert", &e),
                    }
                } else if topic == t.commands {
                    match serde_json::from_slice::<Command>(m.payload().unwrap_or_default()) {
                        Ok(c) => commands.push(c),
                        Err(e) => bad("command", &e),
                    }
                }
            }
        }
        if last_handover.elapsed() >= HAND_OVER || force_handover {
            last_handover = Instant::now();
            view.push_batch(oldest, &verdicts, &alerts, &commands, std::mem::take(&mut twins));
            if std::mem::take(&mut force_handover) {
                shown_at = Some(view.generation() + 2);
            }
            verdicts.clear();
            alerts.clear();
            commands.clear();
            oldest = None;
            ev::TwinsCounted { twins: live.len() }.emit(&metrics);
        }
        if shown_at.is_some_and(|g| view.generation() >= g) {
            shown_at = None;
            ev::FleetReady { twins: live.len(), millis: Some(started.elapsed().as_millis() as u64), view_rows: view.twins_rows(), view_bytes: view.twins_bytes() }
                .emit(&metrics);
        }
        if last_lag.elapsed() >= Duration::from_secs(5) {
            last_lag = Instant::now();
            ev::LagSampled { lag: kafka::lag(&consumer, &t.changelog, &changelog_parts) }.emit(&metrics);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `twinguard sql` applies the pipeline's restore rule to each changelog record: a
    /// twin becomes its row, a tombstone removes it, and an undecodable or oversized
    /// record is quarantined (removed, with the reason) instead of stopping the reader.
    #[test]
    fn a_changelog_record_goes_through_the_pipelines_restore_rule() {
        let (schema, op) = crate::tools::testkit::simulated_twins(1, 50, 3);
        let twin = op.store().iter().next().expect("a twin").clone();
        let bytes = twin.encode();
        let rows = RowMaker::new(&schema, false);
        assert!(matches!(changelog_change(&twin.device_id, Some(&bytes), 65_536, &rows), Change::Upsert(_)));
        assert!(matches!(changelog_change(&twin.device_id, None, 65_536, &rows), Change::Remove(None)));
        assert!(matches!(changelog_change("dev", Some(b"not a twin"), 65_536, &rows), Change::Remove(Some(_))));
        match changelog_change(&twin.device_id, Some(&bytes), bytes.len() - 1, &rows) {
            Change::Remove(Some(why)) => assert!(why.contains("max_twin_bytes"), "{why}"),
            _ => panic!("an oversized record is quarantined"),
        }
    }
}
