//! The verdict contract: one record per valid event on the verdicts topic, keyed by
//! device id, carrying the event's source coordinates so consumers can deduplicate.
//!
//! Version 1 (`"v": 1`). Fields are only ever added; a consumer MUST ignore fields it
//! does not know. A verdict MUST be a pure function of the event and the twin state
//! before it (no processing-time fields), so a replayed event yields a byte-identical
//! verdict.

use std::sync::Arc;

use arrow::array::{
    Array, BooleanArray, Float64Array, Int32Array, Int64Array, StringArray, TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use serde::{Deserialize, Serialize};

use crate::decode::fmt_ms;
use crate::fields;

/// Contract version written in every verdict.
pub const VERDICT_VERSION: u32 = 1;
/// Name of the detector that produced a v1 verdict.
pub const DETECTOR_TWIN: &str = "twin_behaviour";
/// Name of the detector when a trained model scores the event.
pub const DETECTOR_ENSEMBLE: &str = "ensemble";

/// Columns a model adds to the verdict batch, in order (all nullable).
pub const MODEL_COLUMNS: [&str; 9] =
    ["model_version", "ensemble_score", "threshold", "rf_score", "svm_score", "lstm_score", "twin_score", "gbdt_score", "attack_class"];

/// Arrow fields of [`MODEL_COLUMNS`].
pub fn model_columns() -> Vec<Field> {
    MODEL_COLUMNS
        .iter()
        .map(|&n| Field::new(n, if n == "model_version" || n == "attack_class" { DataType::Utf8 } else { DataType::Float64 }, true))
        .collect()
}

/// Per-model scores of a verdict scored by the ensemble.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelScores {
    /// Stacked ensemble probability of attack.
    pub ensemble: f64,
    /// Random forest probability of attack.
    pub rf: f64,
    /// SVM decision value (positive = attack side).
    pub svm: f64,
    /// LSTM probability of attack (stepped on the device's recurrent state).
    pub lstm: f64,
    /// Twin behavioural score.
    pub twin: f64,
    /// Gradient-boosted trees probability of attack (absent from models and
    /// verdicts made before that member existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gbdt: Option<f64>,
}

/// Where the event came from: the deduplication key of its outputs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceCoords {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

/// A verdict as it appears on the verdicts topic (JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    pub v: u32,
    pub device_id: String,
    pub event_time: String,
    pub source: SourceCoords,
    pub detector: String,
    /// Anomaly score in [0, 1): 0.5 at the configured threshold distance.
    pub score: f64,
    /// Behavioural distance of the event from the device's own baseline.
    pub distance: f64,
    pub anomalous: bool,
    /// The twin had not yet seen enough events to judge; `anomalous` is false.
    pub warming_up: bool,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top_metric: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub top_z: Option<f64>,
    /// Identity bindings this event broke (field names), e.g. `["src_mac"]`.
    #[serde(skip_serializing_if = "Vec::is_empty", default)]
    pub identity_drift: Vec<String>,
    /// Ground truth passed through from replayed datasets, if the event had one.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub label: Option<String>,
    /// Version of the model that scored the event (`detector` = `ensemble`); then
    /// `score` is the ensemble probability and `anomalous` means `score >= threshold`.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub model_version: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub threshold: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub scores: Option<ModelScores>,
    /// Most probable attack class, when the verdict is an attack.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub attack_class: Option<String>,
}

/// Arrow schema of the twin operator's verdict batches.
pub fn verdict_arrow_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new(fields::DEVICE_ID, DataType::Utf8, false),
        Field::new(fields::EVENT_TIME, DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new(fields::SRC_PARTITION, DataType::Int32, false),
        Field::new(fields::SRC_OFFSET, DataType::Int64, false),
        Field::new(fields::SCORE, DataType::Float64, false),
        Field::new(fields::DISTANCE, DataType::Float64, false),
        Field::new(fields::ANOMALOUS, DataType::Boolean, false),
        Field::new(fields::WARMING_UP, DataType::Boolean, false),
        Field::new(fields::TOP_METRIC, DataType::Utf8, true),
        Field::new(fields::TOP_Z, DataType::Float64, true),
        Field::new(fields::DRIFT, DataType::Utf8, true),
        Field::new(fields::LABEL, DataType::Utf8, true),
    ]))
}

/// Turn a verdict batch (with [`verdict_arrow_schema`]) into contract records.
pub fn verdicts_from_batch(batch: &RecordBatch, topic: &str) -> Vec<Verdict> {
    fn col<'a, T: 'static>(b: &'a RecordBatch, i: usize) -> &'a T {
        b.column(i).as_any().downcast_ref::<T>().expect("verdict batch has the verdict schema")
    }
    let dev = col::<StringArray>(batch, 0);
    let time = col::<TimestampMillisecondArray>(batch, 1);
    let part = col::<Int32Array>(batch, 2);
    let off = col::<Int64Array>(batch, 3);
    let score = col::<Float64Array>(batch, 4);
    let dist = col::<Float64Array>(batch, 5);
    let anom = col::<BooleanArray>(batch, 6);
    let warm = col::<BooleanArray>(batch, 7);
    let top = col::<StringArray>(batch, 8);
    let top_z = col::<Float64Array>(batch, 9);
    let drift = col::<StringArray>(batch, 10);
    let label = col::<StringArray>(batch, 11);
    let model = (batch.num_columns() >= 12 + MODEL_COLUMNS.len()).then(|| {
        (
            col::<StringArray>(batch, 12),
            [13, 14, 15, 16, 17, 18, 19].map(|i| col::<Float64Array>(batch, i)),
            col::<StringArray>(batch, 20),
        )
    });
    (0..batch.num_rows())
        .map(|r| {
            let mut v = Verdict {
            v: VERDICT_VERSION,
            device_id: dev.value(r).to_string(),
            event_time: fmt_ms(time.value(r)),
            source: SourceCoords { topic: topic.to_string(), partition: part.value(r), offset: off.value(r) },
            detector: DETECTOR_TWIN.to_string(),
            score: score.value(r),
            distance: dist.value(r),
            anomalous: anom.value(r),
            warming_up: warm.value(r),
            top_metric: (!top.is_null(r)).then(|| top.value(r).to_string()),
            top_z: (!top_z.is_null(r)).then(|| top_z.value(r)),
            identity_drift: if drift.is_null(r) {
                Vec::new()
            } else {
                drift.value(r).split(',').map(str::to_string).collect()
            },
            label: (!label.is_null(r)).then(|| label.value(r).to_string()),
            model_version: None,
            threshold: None,
            scores: None,
            attack_class: None,
        };
            if let Some((ver, f, class)) = &model {
                if !ver.is_null(r) {
                    v.detector = DETECTOR_ENSEMBLE.to_string();
                    v.model_version = Some(ver.value(r).to_string());
                    v.score = f[0].value(r);
                    v.threshold = Some(f[1].value(r));
                    v.scores = Some(ModelScores {
                        ensemble: f[0].value(r),
                        rf: f[2].value(r),
                        svm: f[3].value(r),
                        lstm: f[4].value(r),
                        twin: f[5].value(r),
                        gbdt: (!f[6].is_null(r)).then(|| f[6].value(r)),
                    });
                    v.attack_class = (!class.is_null(r)).then(|| class.value(r).to_string());
                }
            }
            v
        })
        .collect()
}
