//! twinguard's pipeline: configuration, the Kafka source and sink, the topology
//! that runs the operators, the device simulator and the CLI (training, evaluation
//! and dataset reading live in `twinguard-train`).
//!
//! Architecture Invariant: with `twinguard-train` (files only), this is the only
//! crate that does I/O, and the only one that touches Kafka. It holds no detection
//! or business rules: those live in `operators` and `models`.

// Rooms, each with one job; imports run one way (ARCHITECTURE.md, checked by
// `layout_tests.rs`): config <- kafka <- tools; config <- obs;
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

/// Errors of the pipeline. Messages name the input, key or topic at fault.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error("configuration error: {0}")]
    Config(String),
    #[error("kafka: {context}: {source}")]
    Kafka { context: String, source: rdkafka::error::KafkaError },
    #[error("{0}")]
    Io(String),
    #[error(transparent)]
    Schema(#[from] twinguard_schemas::SchemaError),
    #[error(transparent)]
    Operator(#[from] twinguard_operators::OperatorError),
    #[error(transparent)]
    Train(#[from] twinguard_train::TrainError),
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
}

#[cfg(test)]
mod layout_tests;
