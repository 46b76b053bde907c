//! Held-out figures from the detector's scores: the evaluation report.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use serde::{Deserialize, Serialize};

use crate::ensemble::{MemberScores, MEMBERS};
use crate::metrics::{self, Binary, MultiClass};
use crate::train::Split;
use crate::{labels, Artifact};

/// Scores of every event from the detector with the model (the stream's code path).
#[derive(Debug, Clone, Default)]
pub struct Scores {
    /// Each scored event's index in the records scored (its offset).
    pub offsets: Vec<i64>,
    pub members: Vec<MemberScores>,
    pub ensemble: Vec<f64>,
    pub attack: Vec<bool>,
    pub class: Vec<Option<String>>,
    pub truth: Vec<String>,
    pub rejected: usize,
}

/// One model's figures on the test rows.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelReport {
    /// Threshold chosen on the validation rows for the target FPR
    /// ([`metrics::calibrate_threshold`]).
    pub at_threshold: Binary,
    /// Detection rate per attack class.
    pub recall_by_class: BTreeMap<String, f64>,
    #[serde(skip)]
    pub scores: Vec<f64>,
}

/// The evaluation report (`report.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub model_version: String,
    pub dataset: String,
    pub split: String,
    pub target_fpr: f64,
    pub rows: BTreeMap<String, usize>,
    pub rejected_records: usize,
    pub models: BTreeMap<String, ModelReport>,
    /// Verdict class (normal unless the ensemble flags the event; then the forest's
    /// most probable attack class) against the truth, fine classes.
    pub classes: MultiClass,
    /// The same at family level (CICIoMT2024's 6 families).
    pub families: MultiClass,
    /// Families among the attacks the ensemble detected: how well the class model
    /// names what was caught (normal excluded from the macro average: no row of
    /// it is in this set).
    #[serde(default)]
    pub families_detected: Option<MultiClass>,
    /// How the members were combined and the threshold's FPR law on validation.
    #[serde(default)]
    pub combination: Option<crate::ensemble::Combination>,
    #[serde(skip)]
    pub test_truth: Vec<bool>,
}

/// Figures on the test rows; single members get thresholds calibrated on the
/// validation rows for the same target FPR as the ensemble.
pub fn evaluate(artifact: &Artifact, scores: &Scores, split: &Split, dataset: &str) -> Report {
    let target = artifact.card.target_fpr;
    let is_attack = |i: usize| scores.truth[i] != labels::NORMAL;
    let vy: Vec<bool> = split.validation.iter().map(|&i| is_attack(i)).collect();
    let ty: Vec<bool> = split.test.iter().map(|&i| is_attack(i)).collect();
    let mut models = BTreeMap::new();
    let member_names: Vec<&str> = std::iter::once("ensemble").chain(MEMBERS).collect();
    for name in member_names {
        let get = |i: usize| if name == "ensemble" { scores.ensemble[i] } else { scores.members[i].get(name) };
        let stored = artifact.ensemble.combination.as_ref().and_then(|c| c.member_thresholds.get(name).copied());
        let thr = if name == "ensemble" {
            artifact.ensemble.threshold
        } else if let Some(t) = stored {
            // Set at training on the training data's validation rows: the same
            // value as below when evaluating that split, and the only honest one for
            // a file the model never saw.
            t
        } else {
            metrics::calibrate_labelled(split.validation.iter().zip(&vy).map(|(&i, &y)| (get(i), y)), target)
        };
        let ts: Vec<f64> = split.test.iter().map(|&i| get(i)).collect();
        let b = metrics::binary(&ts, &ty, thr);
        let mut by: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for (k, &i) in split.test.iter().enumerate() {
            if ty[k] {
                let e = by.entry(scores.truth[i].clone()).or_default();
                e.1 += 1;
                e.0 += u64::from(ts[k] >= thr);
            }
        }
        let recall_by_class = by.into_iter().map(|(c, (hit, n))| (c, hit as f64 / n.max(1) as f64)).collect();
        models.insert(name.to_string(), ModelReport { at_threshold: b, recall_by_class, scores: ts });
    }
    let classes = &artifact.ensemble.classes;
    let cidx: HashMap<&str, usize> = classes.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let truth_c: Vec<usize> = split.test.iter().map(|&i| cidx.get(scores.truth[i].as_str()).copied().unwrap_or(0)).collect();
    let pred_c: Vec<usize> = split
        .test
        .iter()
        .map(|&i| scores.class[i].as_deref().and_then(|c| cidx.get(c).copied()).filter(|_| scores.attack[i]).unwrap_or(0))
        .collect();
    let fams: Vec<String> = classes.iter().map(|c| artifact.family(c)).collect::<BTreeSet<_>>().into_iter().collect();
    let mut fams_sorted = vec![labels::NORMAL.to_string()];
    fams_sorted.extend(fams.into_iter().filter(|f| f != labels::NORMAL));
    let fidx: HashMap<&str, usize> = fams_sorted.iter().enumerate().map(|(i, c)| (c.as_str(), i)).collect();
    let fam_of = |c: usize| fidx[artifact.family(&classes[c]).as_str()];
    let mut rows = BTreeMap::new();
    rows.insert("train".to_string(), split.train.len());
    rows.insert("validation".to_string(), split.validation.len());
    rows.insert("test".to_string(), split.test.len());
    Report {
        model_version: artifact.version.clone(),
        dataset: dataset.to_string(),
        split: artifact.card.split.clone(),
        target_fpr: target,
        rows,
        rejected_records: scores.rejected,
        models,
        classes: metrics::multiclass(&truth_c, &pred_c, classes),
        families: metrics::multiclass(
            &truth_c.iter().map(|&c| fam_of(c)).collect::<Vec<_>>(),
            &pred_c.iter().map(|&c| fam_of(c)).collect::<Vec<_>>(),
            &fams_sorted,
        ),
        families_detected: {
            let hit: Vec<usize> = (0..split.test.len()).filter(|&k| truth_c[k] != 0 && pred_c[k] != 0).collect();
            (!hit.is_empty()).then(|| {
                let t: Vec<usize> = hit.iter().map(|&k| fam_of(truth_c[k])).collect();
                let p: Vec<usize> = hit.iter().map(|&k| fam_of(pred_c[k])).collect();
                metrics::multiclass(&t, &p, &fams_sorted)
            })
        },
        combination: artifact.ensemble.combination.clone(),
        test_truth: ty,
    }
}
