//! The stages of the stream and the state they keep, over Arrow batches.
//!
//! There is no common operator trait: each stage has the signature its job needs,
//! and the engine (`pipeline/src/engine/`) calls them in this order, one partition's
//! micro-batch at a time, timing each (`StageFinished`) and counting their outputs.
//! The contracts:
//!
//! - **decode** (`twinguard_schemas::Decoder::decode`): raw records -> one Arrow
//!   batch of valid events plus one reject (code, reason) per invalid record; never
//!   fails on bad input, every record is a row or a reject, in input order.
//! - **detect** ([`Detector::detect`], over [`TwinOperator`]): events -> one verdict
//!   row per event, in order; updates each device's twin, applying an event at most
//!   once (replays below a twin's last offset are skipped), and queues a changelog
//!   record per changed twin ([`TwinOperator::drain_changelog`]).
//! - **respond** ([`Responder::respond`]): events + verdicts -> alerts, commands and
//!   audit records ([`Responses`]), deciding from the twin's response state; acks
//!   ([`Responder::apply_ack`]) and analyst feedback ([`Gate`]) come in on their own
//!   topics.
//! - **tick** (processing time, every `batch.expiry_interval_secs`): idle-twin
//!   sweep ([`TwinOperator::expire`]), command expiry ([`Responder::expire_commands`]),
//!   gate re-evaluation ([`Gate::tick`]). A tick only reclaims memory and ends
//!   waits: what a twin holds after an event never depends on when ticks ran.
//! - **restore / revoke**: a newly assigned partition's twins are rebuilt from the
//!   changelog ([`TwinOperator::restore_record`]) before any of its records is
//!   processed; a revoked partition's twins and response state are dropped
//!   ([`TwinStore::drop_partition`], [`Responder::drop_partition`]).
//!
//! Stages are synchronous and deterministic: the same batches in the same order give
//! the same outputs and state.
//!
//! Architecture Invariant: no stage does I/O (no Kafka, sockets, files or clock
//! reads). Time comes in with the data (event time) or as the `now` argument of a
//! tick or a response decision.

pub mod audit;
#[cfg(feature = "scoring")]
pub mod detect;
#[cfg(feature = "scoring")]
pub mod features;
/// Fuzz-target properties (`fuzz/`), replayed over the committed corpora by the tests.
#[cfg(any(test, fuzzing))]
pub mod fuzz_check;
pub mod gate;
pub mod respond;
pub mod response_state;
pub mod twin;

#[cfg(feature = "scoring")]
pub use detect::Detector;
pub use gate::{Gate, GateStatus, GatingConfig, Transition};
pub use respond::{PolicyConfig, Registry, Responder, Responses};
pub use twin::{ChangelogRecord, Expiry, Twin, TwinConfig, TwinOperator, TwinStore};

/// A setting a stage cannot work with: its key within the stage's configuration
/// section (`ewma_alpha`, `rules[2].name`) and why. The pipeline's configuration
/// prefixes the section (`state.ewma_alpha`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("key `{key}`: {reason}")]
pub struct InvalidSetting {
    pub key: String,
    pub reason: String,
}

impl InvalidSetting {
    pub fn new(key: impl Into<String>, reason: impl Into<String>) -> Self {
        InvalidSetting { key: key.into(), reason: reason.into() }
    }
}

/// Event time in milliseconds since the Unix epoch.
pub type EventTime = i64;

/// Errors of operators.
#[derive(Debug, thiserror::Error)]
pub enum OperatorError {
    #[error(transparent)]
    Arrow(#[from] arrow::error::ArrowError),
    #[error("input batch does not match the operator's schema: {0}")]
    Schema(String),
    #[error("feature query: {0}")]
    Features(String),
    #[cfg(feature = "scoring")]
    #[error("model: {0}")]
    Model(#[from] twinguard_models::ModelError),
    #[error("cannot restore twin `{key}` from the changelog: {reason}")]
    Restore { key: String, reason: String },
    /// A changelog value that is not a twin at all (corrupt, truncated, foreign):
    /// a bad record to set aside, unlike [`OperatorError::Restore`] (a twin of
    /// another schema or version: a configuration error).
    #[error("changelog value of twin `{key}` does not decode: {reason}")]
    Undecodable { key: String, reason: String },
}

#[cfg(test)]
mod tests;
#[cfg(all(test, feature = "scoring"))]
mod features_tests;
