//! Operators over Arrow batches, and the device twins they keep.
//!
//! An operator takes a [`RecordBatch`], updates its state, and pushes output batches
//! with its declared schema. Operators are synchronous and deterministic: the same
//! input batches in the same order MUST give the same outputs and state.
//!
//! Architecture Invariant: no operator does I/O (no Kafka, sockets, files or clock
//! reads). Time comes in with the data (event time) or through [`Operator::on_tick`].

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;

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

/// Collects the batches an operator emits.
#[derive(Debug, Default)]
pub struct Output {
    batches: Vec<RecordBatch>,
}

impl Output {
    pub fn new() -> Self {
        Self::default()
    }
    /// Emit a batch. Empty batches are dropped.
    pub fn push(&mut self, batch: RecordBatch) {
        if batch.num_rows() > 0 {
            self.batches.push(batch);
        }
    }
    pub fn take(&mut self) -> Vec<RecordBatch> {
        std::mem::take(&mut self.batches)
    }
}

/// A stream operator. Only [`process_batch`](Operator::process_batch) is required.
///
/// Every batch pushed to `out` MUST have [`output_schema`](Operator::output_schema)
/// (checked in debug builds by [`check_output`]).
pub trait Operator: Send {
    fn name(&self) -> &'static str;
    fn output_schema(&self) -> SchemaRef;
    fn process_batch(&mut self, batch: RecordBatch, out: &mut Output) -> Result<(), OperatorError>;
    /// Called periodically with the processing clock; default: nothing.
    fn on_tick(&mut self, _now: EventTime, _out: &mut Output) -> Result<(), OperatorError> {
        Ok(())
    }
    /// Called when the outputs up to `epoch` are durable; default: nothing.
    fn on_checkpoint(&mut self, _epoch: u64) -> Result<(), OperatorError> {
        Ok(())
    }
}

/// Debug-build check that emitted batches carry the operator's declared schema.
pub fn check_output(op: &dyn Operator, batches: &[RecordBatch]) {
    if cfg!(debug_assertions) {
        let want = op.output_schema();
        for b in batches {
            debug_assert_eq!(
                b.schema().fields(),
                want.fields(),
                "operator `{}` emitted a batch with the wrong schema",
                op.name()
            );
        }
    }
}

#[cfg(test)]
mod tests;
