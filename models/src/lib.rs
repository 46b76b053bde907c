//! Detectors over feature vectors: random forest, SVM, LSTM (burn), the stacked
//! ensemble that aggregates them with the twin's behavioural score, and their
//! training and evaluation.
//!
//! Architecture Invariant: this crate is pure computation. No Kafka, no tokio, no
//! sockets; files only through [`artifact`] load/save called by the CLI.

pub mod artifact;
pub mod boost;
pub mod combine;
pub mod ensemble;
pub mod eval;
pub mod federated;
pub mod forest;
pub mod hist;
pub mod labels;
pub mod lstm;
mod lstm_step;
pub mod matrix;
pub mod metrics;
pub mod svm;
pub mod train;
mod vector;
mod walk;

pub use artifact::{Artifact, ModelCard, Provenance};
pub use ensemble::{Ensemble, MemberScores, Prepared, Scored, Scratch, Stacker, Standardizer};
pub use matrix::Matrix;

/// Errors of model training, loading and scoring.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("invalid training data: {0}")]
    Data(String),
    #[error("invalid parameter {name}: {why}")]
    Param { name: &'static str, why: String },
    #[error("training failed: {0}")]
    Train(String),
    #[error("model artifact: {0}")]
    Artifact(String),
}
