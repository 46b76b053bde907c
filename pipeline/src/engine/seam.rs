//! The engine's two edges as interfaces: where records come from ([`RecordSource`]) and
//! where outputs go ([`RecordSink`]). In production both are librdkafka clients
//! ([`KafkaSource`] over the group consumer, the `SinkProducer`s); the engine's
//! tests drive the same core loop and commit stages with in-memory fakes
//! (`seam_tests.rs`), so batching, acknowledgement order and revoke are checked
//! without a broker.

use super::*;

/// Which of the engine's subscribed topics a record came from.
pub(crate) enum Origin {
    Input,
    Acks,
    /// Not one the engine reads (reported and ignored).
    Other(String),
}

/// One consumed record, owned.
pub(crate) struct Polled {
    pub origin: Origin,
    pub partition: i32,
    pub offset: i64,
    /// Producer create time or broker append time (ms since the epoch).
    pub ts: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub payload: Option<Vec<u8>>,
}

/// The input side: records in offset order per partition, and offsets stored for
/// the background commit. Rebalance callbacks run inside `poll`, as librdkafka's do.
pub(crate) trait RecordSource: Send + Sync {
    /// The next record, an error the client will retry past, or None when nothing
    /// arrived within `timeout`.
    fn poll(&self, timeout: Duration) -> Option<Result<Polled, String>>;
    /// Mark `offset` of `topic`/`partition` processed: the next commit resumes after it.
    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String>;
}

/// Where outputs go. Every record handed to `send_all` is acknowledged later,
/// exactly once, through its own probe when it has one, otherwise through `group`.
pub(crate) trait RecordSink: Send + Sync {
    fn send_all(&self, records: &[OutRecord], group: &Arc<AckGroup>, abort: &AtomicBool);
    /// Drop what is queued and not yet sent (fail-stop after a lost assignment).
    fn purge(&self);
}

impl RecordSink for SinkProducer {
    fn send_all(&self, records: &[OutRecord], group: &Arc<AckGroup>, abort: &AtomicBool) {
        kafka::send_all(self, records, group, abort);
    }

    fn purge(&self) {
        rdkafka::producer::Producer::purge(self, rdkafka::producer::PurgeConfig::default().queue());
    }
}

/// The group consumer as the engine's [`RecordSource`].
pub(crate) struct KafkaSource {
    pub consumer: Arc<BaseConsumer<SourceContext>>,
    pub input: String,
    pub acks: String,
}

impl RecordSource for KafkaSource {
    fn poll(&self, timeout: Duration) -> Option<Result<Polled, String>> {
        Some(match self.consumer.poll(timeout)? {
            Err(e) => Err(e.to_string()),
            Ok(m) => Ok(Polled {
                origin: if m.topic() == self.input {
                    Origin::Input
                } else if m.topic() == self.acks {
                    Origin::Acks
                } else {
                    Origin::Other(m.topic().to_string())
                },
                partition: m.partition(),
                offset: m.offset(),
                ts: m.timestamp().to_millis(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
            }),
        })
    }

    fn store_offset(&self, topic: &str, partition: i32, offset: i64) -> Result<(), String> {
        self.consumer.store_offset(topic, partition, offset).map_err(|e| e.to_string())
    }
}
