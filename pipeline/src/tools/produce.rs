//! Writing records into a topic (simulator, replay, demo, benches), with their
//! acknowledged coordinates returned so results can be matched to ground truth.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Message};

use crate::config::Config;
use crate::kafka;
use crate::PipelineError;

#[derive(Default)]
struct Coords {
    slots: Mutex<Vec<Option<(i32, i64)>>>,
    errors: Mutex<Vec<String>>,
    acked: AtomicUsize,
    /// The idempotent producer has its producer id (from librdkafka's statistics).
    has_pid: AtomicBool,
}

struct CoordContext(Arc<Coords>);

impl ClientContext for CoordContext {
    /// Statistics are on for paced producers only (every 50 ms, for the producer's
    /// life); they are read only until the producer id is there: a byte search,
    /// not a parse, and nothing after.
    fn stats_raw(&self, statistics: &[u8]) {
        // librdkafka writes it exactly so (rdkafka.c, `rd_kafka_stats_emit_all`).
        const ASSIGNED: &[u8] = b"\"idemp_state\": \"Assigned\"";
        if !self.0.has_pid.load(Ordering::Relaxed) && statistics.windows(ASSIGNED.len()).any(|w| w == ASSIGNED) {
            self.0.has_pid.store(true, Ordering::Relaxed);
        }
    }
}

impl ProducerContext for CoordContext {
    type DeliveryOpaque = usize;
    fn delivery(&self, r: &DeliveryResult<'_>, idx: usize) {
        match r {
            Ok(m) => {
                let mut s = self.0.slots.lock().expect("coords lock");
                if s.len() <= idx {
                    s.resize(idx + 1, None);
                }
                s[idx] = Some((m.partition(), m.offset()));
            }
            Err((e, _)) => self.0.errors.lock().expect("errors lock").push(e.to_string()),
        }
        self.0.acked.fetch_add(1, Ordering::Relaxed);
    }
}

/// Produce `(key, value)` records to `topic` (idempotent producer, keyed), at most
/// `rate` records/s when given, calling `progress(sent, acked)` about every 1,000
/// records. Returns each record's `(partition, offset)` in input order. Fails, naming
/// the first error, if any record was not acknowledged.
pub fn produce_all(
    cfg: &Config,
    topic: &str,
    records: impl IntoIterator<Item = (String, Vec<u8>)>,
    rate: Option<f64>,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<(i32, i64)>, PipelineError> {
    let coords = Arc::new(Coords::default());
    let paced = rate.is_some_and(|r| r > 0.0);
    let mut config = kafka::producer_config(cfg);
    if paced {
        config.set("statistics.interval.ms", "50");
    }
    let producer: ThreadedProducer<CoordContext> =
        config.create_with_context(CoordContext(coords.clone())).map_err(|e| PipelineError::kafka("create producer", e))?;
    if paced {
        // Paced sends stand for live traffic, whose create time should be when a
        // record can enter the topic. A new idempotent producer holds records until
        // it has its producer id (~0.5 s in librdkafka): start sending once it has.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !coords.has_pid.load(Ordering::Relaxed) {
            if Instant::now() > deadline {
                return Err(PipelineError::Broker(format!("producing to `{topic}`: no producer id from the brokers after 30 s")));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let started = Instant::now();
    let mut n = 0usize;
    for (key, value) in records {
        loop {
            let rec = BaseRecord::with_opaque_to(topic, n).key(key.as_bytes()).payload(&value);
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(PipelineError::kafka(&format!("produce to `{topic}`"), e)),
            }
        }
        n += 1;
        if n % 1000 == 0 {
            progress(n, coords.acked.load(Ordering::Relaxed));
        }
        if let Some(r) = rate.filter(|r| *r > 0.0) {
            let due = Duration::from_secs_f64(n as f64 / r);
            // Sleep only once a millisecond ahead: per-record sleeps at tens of
            // thousands of records/s cost more CPU than the sending itself.
            if let Some(wait) = due.checked_sub(started.elapsed()).filter(|w| *w >= Duration::from_millis(1)) {
                std::thread::sleep(wait);
            }
        }
    }
    producer.flush(Duration::from_secs(120)).map_err(|e| PipelineError::kafka(&format!("flush to `{topic}`"), e))?;
    progress(n, coords.acked.load(Ordering::Relaxed));
    if let Some(e) = coords.errors.lock().expect("errors lock").first() {
        return Err(PipelineError::Broker(format!("producing to `{topic}` failed: {e}")));
    }
    let mut slots = std::mem::take(&mut *coords.slots.lock().expect("coords lock"));
    slots.resize(n, None);
    slots
        .into_iter()
        .enumerate()
        .map(|(i, c)| c.ok_or_else(|| PipelineError::Broker(format!("record {i} to `{topic}` was never acknowledged"))))
        .collect()
}
