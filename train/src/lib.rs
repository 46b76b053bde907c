//! Offline training and evaluation of twinguard's detectors on labelled dataset
//! files, through the SAME path the stream runs: dataset rows → JSON events →
//! decoder → twin → feature SQL → ensemble. Evaluation scores with the
//! `Detector` itself, so `twinguard eval` and a replay through Kafka see identical
//! numbers.
//!
//! Files only: this crate reads dataset files and writes model directories
//! (artifact, model card, report, plots). It never touches Kafka or sockets.
//!
//! Pure fitting and evaluation live in `twinguard_models::{train, eval}`; this crate
//! feeds them. Imports run one way: `job → {dataset, features, report, plots, split}`;
//! `plots` and `report` know nothing of `job`.

use std::path::PathBuf;

pub mod adversarial;
pub mod attack;
pub mod dataset;
pub mod features;
pub mod federate;
pub mod job;
pub mod plots;
pub mod report;
pub mod split;
pub mod testkit;

pub use dataset::{load, sha256_file, DatasetSpec, ReplayOptions, ReplayStats, OFFLINE_START_MS};
pub use features::{prepare, score_stream, Prepared, Scores};
pub use federate::{render_federation, render_local, run_federate, run_local_only};
pub use twinguard_models::train::{Progress, ScreenReport, TrainOptions};
pub use job::{run_eval, run_train, train_records, twin_config_of, write_outputs, write_scores, EvalOptions, Recipe, TrainJob};
pub use report::{render, ModelReport, Report};
pub use split::{Split, SplitKind, SplitSpec};

/// Errors of training and evaluation, by kind of fault.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// A dataset file that cannot be read, or whose rows do not fit the schema.
    #[error("{}: {reason}", path.display())]
    Dataset { path: PathBuf, reason: String },
    /// A setting that does not fit the data: `key` names it.
    #[error("{key}: {reason}")]
    Config { key: String, reason: String },
    /// Fitting failed, or a model artifact is unusable.
    #[error("{0}")]
    Model(#[from] twinguard_models::ModelError),
    /// An output file or directory that cannot be written.
    #[error("cannot write {}: {reason}", path.display())]
    Io { path: PathBuf, reason: String },
    #[error(transparent)]
    Schema(#[from] twinguard_schemas::SchemaError),
    #[error(transparent)]
    Operator(#[from] twinguard_operators::OperatorError),
}

impl TrainError {
    pub fn dataset(path: &std::path::Path, reason: impl Into<String>) -> Self {
        TrainError::Dataset { path: path.to_path_buf(), reason: reason.into() }
    }
}
