//! The detector: twin update → features (DataFusion SQL) → ensemble score, as one
//! operator. Without a model it is the twin's behavioural detector alone.
//!
//! Contract:
//! - Scoring an event steps its device's LSTM state (kept in the twin, so it goes to
//!   the changelog with the rest of the twin and survives restarts). An event the
//!   twin skips as a replay is not scored, so no state is stepped twice.
//! - The verdict of an event depends only on the event, the twin state before it and
//!   the model version it is scored with: the same events in the same order give the
//!   same verdicts, whatever the batch boundaries (the stream and `twinguard eval`
//!   rely on this).
//! - Several versions may be loaded at once (a running pipeline switching to a
//!   published model, partition by partition): [`Detector::detect_as`] scores with
//!   the one named. A device's LSTM state belongs to the version that stepped it
//!   (`Twin::lstm_model`): the first event a different version scores starts it from
//!   zero, so a swap is deterministic however the events are batched.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, BooleanBuilder, Float64Builder, RecordBatch, StringArray, StringBuilder};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use twinguard_models::ensemble::Prepared;
use twinguard_models::Artifact;
use twinguard_schemas::verdict::{model_columns, verdict_arrow_schema, MODEL_COLUMNS};
use twinguard_schemas::EventSchema;

use crate::features::{FeatureQuery, FeatureRows};
use crate::twin::{version_tag, TwinConfig, TwinOperator};
use crate::OperatorError;

/// A loaded model and the query that feeds it.
struct Loaded {
    artifact: Artifact,
    /// [`version_tag`] of its version.
    tag: u32,
    query: FeatureQuery,
    prepared: Prepared,
}

/// Twin, features and ensemble.
pub struct Detector {
    twin: TwinOperator,
    schema: EventSchema,
    /// Loaded versions, by version.
    models: BTreeMap<String, Loaded>,
    /// The version [`Detector::detect`] scores with (None: the twin alone).
    default: Option<String>,
    out_schema: SchemaRef,
}

/// The twin settings that shape features; a model trained with other values would
/// see different vectors in the stream than in training.
pub fn feature_relevant(cfg: &TwinConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "warmup_events": cfg.warmup_events,
        "ewma_alpha": cfg.ewma_alpha,
        "anomaly_threshold": cfg.anomaly_threshold,
        "top_k": cfg.top_k,
        "min_sd_abs": cfg.min_sd_abs,
        "min_sd_rel": cfg.min_sd_rel,
        "max_bindings_per_field": cfg.max_bindings_per_field,
        "max_peers": cfg.max_peers,
        "window_alpha": cfg.window_alpha,
    });
    // Calibration changes which events the baselines learn from; recorded only when
    // on, so models trained before it existed still match a pipeline without it.
    if cfg.calibration_events > 0 {
        v["calibration_events"] = cfg.calibration_events.into();
        v["calibration_fpr"] = cfg.calibration_fpr.into();
    }
    v
}

/// Arrow schema of the detector's verdict batches: the twin verdict columns, then
/// the model columns (null when no model is loaded).
pub fn detector_verdict_schema() -> SchemaRef {
    let mut f: Vec<Field> = verdict_arrow_schema().fields().iter().map(|f| f.as_ref().clone()).collect();
    f.extend(model_columns());
    Arc::new(Schema::new(f))
}

impl Detector {
    /// The twin's behavioural detector alone.
    pub fn twin_only(schema: &EventSchema, cfg: TwinConfig) -> Self {
        Detector { twin: TwinOperator::new(schema, cfg), schema: schema.clone(), models: BTreeMap::new(), default: None, out_schema: detector_verdict_schema() }
    }

    /// Twin plus a trained model. Refused (with the reason) when the model was
    /// trained for another event schema or other twin settings, or its feature SQL
    /// does not plan against this schema.
    pub fn with_model(schema: &EventSchema, cfg: TwinConfig, artifact: Artifact) -> Result<Self, OperatorError> {
        let mut d = Detector::twin_only(schema, cfg);
        let version = d.add_model(artifact)?;
        d.default = Some(version);
        Ok(d)
    }

    /// Load another version beside those loaded (a version already loaded is kept
    /// as it is); returns its version. Refused, with the reason, as [`with_model`](Self::with_model).
    pub fn add_model(&mut self, artifact: Artifact) -> Result<String, OperatorError> {
        if self.models.contains_key(&artifact.version) {
            return Ok(artifact.version);
        }
        let schema = &self.schema;
        if artifact.schema != schema.id() {
            return Err(OperatorError::Features(format!(
                "model {} was trained on schema `{}`, the pipeline reads `{}`",
                artifact.version,
                artifact.schema,
                schema.id()
            )));
        }
        let want = feature_relevant(self.twin.config());
        if artifact.twin_config != want {
            return Err(OperatorError::Features(format!(
                "model {} was trained with twin settings {} but the pipeline's [state] is {}: features would differ; use the model's settings or retrain",
                artifact.version, artifact.twin_config, want
            )));
        }
        let query = FeatureQuery::new(&artifact.feature_sql, schema.arrow_schema(), self.twin.context_schema())?;
        if query.names() != artifact.feature_names.as_slice() {
            return Err(OperatorError::Features(format!(
                "model {}: its feature query yields {:?}, the model was trained on {:?}",
                artifact.version,
                query.names(),
                artifact.feature_names
            )));
        }
        let version = artifact.version.clone();
        self.models.insert(version.clone(), Loaded { tag: version_tag(&artifact.version), artifact, query, prepared: Prepared::default() });
        Ok(version)
    }

    /// Whether `version` is loaded.
    pub fn has_model(&self, version: &str) -> bool {
        self.models.contains_key(version)
    }

    pub fn twin(&self) -> &TwinOperator {
        &self.twin
    }
    pub fn twin_mut(&mut self) -> &mut TwinOperator {
        &mut self.twin
    }
    /// The default model's version (what [`detect`](Self::detect) scores with), if any.
    pub fn model_version(&self) -> Option<&str> {
        self.default.as_deref()
    }
    /// The default model.
    pub fn artifact(&self) -> Option<&Artifact> {
        self.default.as_ref().and_then(|v| self.models.get(v)).map(|m| &m.artifact)
    }
    /// Apply and score one event batch with the default model; returns the verdict
    /// batch ([`detector_verdict_schema`]) and, when a model is loaded, the feature rows.
    pub fn detect(&mut self, batch: &RecordBatch) -> Result<(RecordBatch, Option<FeatureRows>), OperatorError> {
        let version = self.default.clone();
        self.detect_as(batch, version.as_deref())
    }

    /// [`detect`](Self::detect) with the loaded `version` (None: the twin alone).
    pub fn detect_as(&mut self, batch: &RecordBatch, version: Option<&str>) -> Result<(RecordBatch, Option<FeatureRows>), OperatorError> {
        let Some(version) = version else {
            let v = self.twin.process_batch(batch.clone())?;
            return Ok((with_model_columns(&v, self.out_schema.clone(), None)?, None));
        };
        let m = self.models.get_mut(version).ok_or_else(|| OperatorError::Features(format!("model {version} is not loaded")))?;
        let (verdicts, ctx) = self.twin.process_with_context(batch)?;
        let feats = m.query.compute(batch, &ctx)?;
        let n = verdicts.num_rows();
        let devices = ctx.column(0).as_any().downcast_ref::<StringArray>().expect("context device_id");
        let ens = &m.artifact.ensemble;
        // An untagged state (a twin written before tags existed) was stepped by the
        // default model.
        let untagged = self.default.as_deref().map_or(0, version_tag);
        ens.prepare(&feats.values, &mut m.prepared);
        let mut cols = ModelCols::new(n);
        let store = self.twin.store_mut();
        for i in 0..n {
            let device = devices.value(i);
            let twin = store.get_mut(feats.partition[i], device).expect("an applied event's twin exists");
            if twin.lstm_model != m.tag {
                let stepped_by = if twin.lstm_model == 0 { untagged } else { twin.lstm_model };
                if stepped_by != m.tag {
                    // Stepped by another version: its state means nothing to this LSTM.
                    twin.lstm.clear();
                }
                twin.lstm_model = m.tag;
            }
            let s = ens.score_prepared(i, feats.row(i), &mut twin.lstm, &m.prepared);
            cols.version.append_value(&m.artifact.version);
            cols.ensemble.append_value(s.ensemble);
            cols.threshold.append_value(ens.threshold);
            cols.rf.append_value(s.members.rf);
            cols.svm.append_value(s.members.svm);
            cols.lstm.append_value(s.members.lstm);
            cols.twin.append_value(s.members.twin);
            if ens.boost.is_some() {
                cols.gbdt.append_value(s.members.gbdt);
            } else {
                cols.gbdt.append_null();
            }
            cols.attack.append_value(s.attack);
            if s.attack {
                cols.class.append_value(&ens.classes[s.class]);
            } else {
                cols.class.append_null();
            }
        }
        Ok((with_model_columns(&verdicts, self.out_schema.clone(), Some(cols))?, Some(feats)))
    }

    /// Feature rows of a batch without scoring (training path; the twin is updated).
    pub fn features_only(&mut self, query: &mut FeatureQuery, batch: &RecordBatch) -> Result<(RecordBatch, FeatureRows), OperatorError> {
        let (verdicts, ctx) = self.twin.process_with_context(batch)?;
        let feats = query.compute(batch, &ctx)?;
        Ok((verdicts, feats))
    }
}

struct ModelCols {
    version: StringBuilder,
    ensemble: Float64Builder,
    threshold: Float64Builder,
    rf: Float64Builder,
    svm: Float64Builder,
    lstm: Float64Builder,
    twin: Float64Builder,
    gbdt: Float64Builder,
    attack: BooleanBuilder,
    class: StringBuilder,
}

impl ModelCols {
    fn new(n: usize) -> Self {
        let f = || Float64Builder::with_capacity(n);
        ModelCols {
            version: StringBuilder::with_capacity(n, n * 32),
            ensemble: f(),
            threshold: f(),
            rf: f(),
            svm: f(),
            lstm: f(),
            twin: f(),
            gbdt: f(),
            attack: BooleanBuilder::with_capacity(n),
            class: StringBuilder::new(),
        }
    }
}

/// Append the model columns (in [`MODEL_COLUMNS`] order) to a twin verdict batch;
/// with a model, `anomalous` becomes the ensemble's decision.
fn with_model_columns(v: &RecordBatch, schema: SchemaRef, cols: Option<ModelCols>) -> Result<RecordBatch, OperatorError> {
    let n = v.num_rows();
    let mut out: Vec<ArrayRef> = v.columns().to_vec();
    match cols {
        None => {
            for f in model_columns() {
                out.push(arrow::array::new_null_array(f.data_type(), n));
            }
        }
        Some(mut c) => {
            let attack = c.attack.finish();
            let mut extra: Vec<ArrayRef> = vec![
                Arc::new(c.version.finish()),
                Arc::new(c.ensemble.finish()),
                Arc::new(c.threshold.finish()),
                Arc::new(c.rf.finish()),
                Arc::new(c.svm.finish()),
                Arc::new(c.lstm.finish()),
                Arc::new(c.twin.finish()),
                Arc::new(c.gbdt.finish()),
                Arc::new(c.class.finish()),
            ];
            debug_assert_eq!(extra.len(), MODEL_COLUMNS.len());
            // The ensemble decides.
            let anomalous_idx = 6;
            debug_assert_eq!(v.schema().field(anomalous_idx).data_type(), &DataType::Boolean);
            out[anomalous_idx] = Arc::new(BooleanArray::from(attack.iter().map(|x| x.unwrap_or(false)).collect::<Vec<_>>()));
            out.append(&mut extra);
        }
    }
    Ok(RecordBatch::try_new(schema, out)?)
}
