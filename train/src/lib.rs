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

pub mod dataset;
pub mod features;
pub mod job;
pub mod plots;
pub mod report;
pub mod split;

pub use dataset::{load, sha256_file, DatasetSpec, ReplayOptions, ReplayStats, OFFLINE_START_MS};
pub use features::{prepare, score_stream, Prepared, Scores};
pub use twinguard_models::train::{Progress, ScreenReport, TrainOptions};
pub use job::{run_eval, run_train, train_records, twin_config_of, write_outputs, Recipe, TrainJob};
pub use report::{render, ModelReport, Report};
pub use split::{Split, SplitKind, SplitSpec};

/// Errors of training and evaluation.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Model(#[from] twinguard_models::ModelError),
    #[error(transparent)]
    Schema(#[from] twinguard_schemas::SchemaError),
    #[error(transparent)]
    Operator(#[from] twinguard_operators::OperatorError),
}
