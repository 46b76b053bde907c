//! twinguard's pipeline: configuration, the Kafka source and sink, the topology
//! that runs the operators, the device simulator and the CLI (training, evaluation
//! and dataset reading live in `twinguard-train`).
//!
//! Architecture Invariant: with `twinguard-train` (files only), this is the only
//! crate that does I/O, and the only one that touches Kafka. It holds no detection
//! or business rules: those live in `operators` and `models`.

// Rooms, each with one job; imports run one way (ARCHITECTURE.md, checked by
// `layout_tests.rs`): config <- obs <- kafka <- tools;
// {config, kafka, obs} <- engine <- sql; app uses any and nothing uses app.
pub mod app;
pub mod config;
pub mod engine;
pub mod kafka;
pub mod obs;
pub mod sql;
pub mod tools;

pub use config::Config;
pub use engine::{run, RunReport};
pub use obs::Metrics;

/// Errors of the pipeline, by kind of fault. Messages name the input, key or topic
/// at fault; `Display` composes each message once.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A setting is wrong, or names something unusable (a file, a topic, a secret):
    /// `key` is the setting (`model.path`, `kafka.consumer."max.poll.interval.ms"`),
    /// `None` when the fault is the configuration as a whole (an unreadable file).
    #[error("configuration error: {}", match key { Some(k) => format!("key `{k}`: {reason}"), None => reason.clone() })]
    Config { key: Option<String>, reason: String },
    /// librdkafka reported an error.
    #[error("kafka: {context}: {source}")]
    Kafka { context: String, source: rdkafka::error::KafkaError },
    /// The brokers answered, but not as the pipeline needs (a topic that was not
    /// created, a read that timed out, a record never acknowledged).
    #[error("kafka: {0}")]
    Broker(String),
    /// The machine refused a resource: a thread, a runtime, a socket, a file, an
    /// exporter.
    #[error("{context}: {source}")]
    Io { context: String, source: Box<dyn std::error::Error + Send + Sync> },
    /// A bug in twinguard: something that cannot happen did.
    #[error("internal error (a bug in twinguard; please report it): {0}")]
    Internal(String),
    #[error(transparent)]
    Schema(#[from] twinguard_schemas::SchemaError),
    #[error(transparent)]
    Operator(#[from] twinguard_operators::OperatorError),
    #[error(transparent)]
    Train(#[from] twinguard_train::TrainError),
    /// The stream stopped on an error it must not go past (a refused output, a
    /// broken audit chain); nothing was committed past it.
    #[error("pipeline stopped on a fatal error (no offsets were stored past it): {0}")]
    Fatal(String),
    /// This member was evicted from its group (a paused process or broker, a session
    /// timeout): it stopped writing, as on a fatal error, and may rejoin as a new
    /// member (the process does, see `twinguard run`).
    #[error("pipeline stopped, its partitions lost (no offsets were stored past its outputs): {0}")]
    AssignmentLost(String),
}

impl PipelineError {
    pub fn kafka(context: &str, source: rdkafka::error::KafkaError) -> Self {
        PipelineError::Kafka { context: context.to_string(), source }
    }

    /// A configuration error naming `key`.
    pub fn config(key: impl Into<String>, reason: impl std::fmt::Display) -> Self {
        PipelineError::Config { key: Some(key.into()), reason: reason.to_string() }
    }

    /// A configuration error of the configuration as a whole (no one key).
    pub fn config_file(reason: impl std::fmt::Display) -> Self {
        PipelineError::Config { key: None, reason: reason.to_string() }
    }

    /// A resource the machine refused, with what was being done.
    pub fn io(context: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        PipelineError::Io { context: context.into(), source: source.into() }
    }
}

#[cfg(test)]
mod layout_tests;
