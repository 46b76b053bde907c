//! The versioned model artifact: the trained ensemble plus everything needed to
//! reproduce its input (event schema, feature SQL, twin settings) and its model card.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ensemble::Ensemble;
use crate::ModelError;

/// Artifact format version; loading refuses other versions.
pub const ARTIFACT_FORMAT: u32 = 1;
/// File name of the artifact inside its directory.
pub const ARTIFACT_FILE: &str = "model.json";

/// A trained detector, ready to load into the pipeline.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Artifact {
    pub format: u32,
    /// Unique model version (`<schema>-<UTC time>-<hash>`), carried by verdicts.
    pub version: String,
    /// Event schema (`name/vN`) the features are computed from.
    pub schema: String,
    /// The feature query (the SAME text runs in the stream).
    pub feature_sql: String,
    pub feature_names: Vec<String>,
    /// Twin settings the features were computed with (the pipeline must run the same).
    pub twin_config: serde_json::Value,
    pub ensemble: Ensemble,
    pub card: ModelCard,
    /// The schema file's text, when the model was trained on a schema that is not
    /// built in (a dataset onboarded by files): `eval` and the pipeline read it here.
    #[serde(default)]
    pub schema_definition: Option<String>,
    /// Family of each class, when the schema file declared a taxonomy (absent: the
    /// built-in taxonomy of the public datasets, [`crate::labels::family`]).
    #[serde(default)]
    pub class_families: std::collections::BTreeMap<String, String>,
    /// Where a federation's model came from (absent from a model trained in one place).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provenance: Option<Provenance>,
}

/// A federated model's provenance: which federation, run and plan made it, what it
/// replaces, every site's acceptance per member and round, and who signed it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Provenance {
    pub federation: String,
    /// The aggregator's run (one training of the federation).
    pub run: String,
    /// Rounds (tasks) the run took.
    pub rounds: u64,
    /// The version this one follows on the federation's model topic, if any.
    pub parent: Option<String>,
    /// SHA-256 of the plan every party shared.
    pub plan_hash: String,
    /// The aggregator's ed25519 public key (hex), which signs the artifact's messages.
    pub aggregator_key: String,
    /// Per member: each site's acceptance, with the robust rule's score and reason.
    pub decisions: std::collections::BTreeMap<String, Vec<crate::federated::robust::Decision>>,
    /// Differential privacy of the published model: ε per member and what was
    /// published without it; null when the federation ran without DP.
    pub dp: Option<crate::federated::privacy::PrivacyReport>,
}

/// What the model was trained on and how well it did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub dataset: String,
    pub dataset_sha256: String,
    pub rows: usize,
    /// How rows were split (e.g. "temporal: train [0, 60 %), validation [60, 80 %), test [80, 100 %)").
    pub split: String,
    pub train_rows: usize,
    pub validation_rows: usize,
    pub test_rows: usize,
    pub hyper_parameters: serde_json::Value,
    pub target_fpr: f64,
    pub threshold: f64,
    /// Evaluation on the held-out test rows (see `twinguard eval` for the full report).
    pub test_metrics: serde_json::Value,
    /// Label screening applied to the training rows, if any.
    pub poisoning_screen: Option<serde_json::Value>,
    pub created_utc: String,
    pub training_seconds: f64,
}

impl Artifact {
    /// The family of a class: the schema file's taxonomy, else the built-in one.
    pub fn family(&self, class: &str) -> String {
        self.class_families.get(class).cloned().unwrap_or_else(|| crate::labels::family(class))
    }

    /// Write `model.json` into `dir` (created if missing); returns its path.
    pub fn save(&self, dir: &Path) -> Result<PathBuf, ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::Artifact(format!("cannot create {}: {e}", dir.display())))?;
        let path = dir.join(ARTIFACT_FILE);
        let tmp = dir.join(format!(".{ARTIFACT_FILE}.tmp"));
        let bytes = serde_json::to_vec(self).map_err(|e| ModelError::Artifact(e.to_string()))?;
        // What is written must load back (JSON has no NaN or infinity: serde writes
        // them as null, which no f64 reads).
        Artifact::from_json(&bytes, "the model to write").map_err(|e| ModelError::Artifact(format!("refusing to write {}: {e}", path.display())))?;
        std::fs::write(&tmp, bytes).map_err(|e| ModelError::Artifact(format!("cannot write {}: {e}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(|e| ModelError::Artifact(format!("cannot write {}: {e}", path.display())))?;
        Ok(path)
    }

    /// Load an artifact from a `model.json` file or the directory holding one.
    pub fn load(path: &Path) -> Result<Artifact, ModelError> {
        let file = if path.is_dir() { path.join(ARTIFACT_FILE) } else { path.to_path_buf() };
        let bytes = std::fs::read(&file).map_err(|e| ModelError::Artifact(format!("cannot read {}: {e}", file.display())))?;
        Artifact::from_json(&bytes, &file.display().to_string())
    }

    /// Parse an artifact's JSON (`origin` names where it came from in errors), with
    /// the checks [`load`](Self::load) makes.
    pub fn from_json(bytes: &[u8], origin: &str) -> Result<Artifact, ModelError> {
        let a: Artifact = serde_json::from_slice(bytes).map_err(|e| ModelError::Artifact(format!("{origin} is not a twinguard model artifact: {e}")))?;
        if a.format != ARTIFACT_FORMAT {
            return Err(ModelError::Artifact(format!("{origin} has artifact format {}, this build reads {ARTIFACT_FORMAT}", a.format)));
        }
        if a.feature_names.len() != a.ensemble.standardizer.cols() {
            return Err(ModelError::Artifact(format!(
                "{origin}: {} feature names but the models take {}",
                a.feature_names.len(),
                a.ensemble.standardizer.cols()
            )));
        }
        Ok(a)
    }
}
