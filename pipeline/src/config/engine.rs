//! `[engine]`: stream workers and how a worker stops.

use serde::{Deserialize, Serialize};

/// How an instance spreads its partitions over threads.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Stream workers (like Kafka Streams' `num.stream.threads`): each is a member
    /// of the consumer group with its own consumer, producers, batches, twins and
    /// detector, so the group spreads the partitions over them and every
    /// per-partition guarantee holds as between instances. Unset: the cores
    /// available to this process.
    pub workers: Option<usize>,
    /// How long a stopping worker waits to leave the consumer group (final commit,
    /// unsubscribe, close) before it stops without it: outputs and offsets are
    /// stored by then, and the group notices the member gone after its session
    /// timeout instead. librdkafka does not bound these steps itself.
    pub close_timeout_secs: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig { workers: None, close_timeout_secs: 30 }
    }
}

/// The most stream workers one instance runs.
pub const MAX_WORKERS: usize = 256;

impl EngineConfig {
    /// The workers to run: the setting, else the cores available (at least 1).
    pub fn workers(&self) -> usize {
        self.workers.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(MAX_WORKERS))
    }
}
