//! The arm a federation must beat: every site training the whole ensemble alone
//! on its own rows (its own validation rows for stacking and the threshold),
//! measured on the same test rows as the federation.

use serde::{Deserialize, Serialize};

use super::simulate::{make_sites, FederationPlan};
use crate::train::{class_index, fit, member_scores, sequences, Dataset, Progress, Split, TrainOptions};
use crate::{labels, metrics, ModelError};

/// One site alone: its figures on the test rows, or why it cannot stand alone.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LocalResult {
    pub site: usize,
    pub train_rows: usize,
    pub validation_normal: usize,
    /// Test figures at its own threshold; `None` when it could not train or calibrate.
    pub detection_rate: Option<f64>,
    pub fpr: Option<f64>,
    pub roc_auc: Option<f64>,
    /// Best test DR at test FPR ≤ 1.5 %, read off the test ROC (comparison only).
    pub dr_at_1_5: Option<f64>,
    pub error: Option<String>,
}

/// Best detection rate with FPR at most `max_fpr` on a ROC curve.
pub fn dr_at_fpr(scores: &[f64], y: &[bool], max_fpr: f64) -> f64 {
    metrics::roc_curve(scores, y, usize::MAX).iter().filter(|(f, _)| *f <= max_fpr + 1e-12).map(|(_, t)| *t).fold(0.0, f64::max)
}

/// Train every site of `plan` alone (no poisoning) and measure it on `split.test`.
pub fn local_only(prep: &Dataset<'_>, split: &Split, twin_threshold: f64, opts: &TrainOptions, plan: &FederationPlan, log: &mut dyn FnMut(Progress<'_>)) -> Result<Vec<LocalResult>, ModelError> {
    let (_, y) = class_index(prep.classes);
    let sites = make_sites(split, &y, &FederationPlan { poisoned: 0, ..plan.clone() })?;
    let truth: Vec<bool> = split.test.iter().map(|&r| prep.classes[r] != labels::NORMAL).collect();
    let mut out = Vec::new();
    for (i, s) in sites.iter().enumerate() {
        let own = Split { train: s.train.clone(), validation: s.validation.clone(), test: split.test.clone() };
        let validation_normal = s.validation.iter().filter(|&&r| prep.classes[r] == labels::NORMAL).count();
        let mut r = LocalResult { site: i, train_rows: s.train.len(), validation_normal, detection_rate: None, fpr: None, roc_auc: None, dr_at_1_5: None, error: None };
        match fit(prep, &own, twin_threshold, opts, &mut |_| {}) {
            Err(e) => r.error = Some(e.to_string()),
            Ok((ens, _)) => {
                let x = ens.standardizer.apply_all(prep.values);
                let all = member_scores(&ens, prep, &x, &sequences(prep.devices, None));
                let scores: Vec<f64> = split.test.iter().map(|&t| ens.stacker.predict(&all[t])).collect();
                let b = metrics::binary(&scores, &truth, ens.threshold);
                r.detection_rate = Some(b.detection_rate);
                r.fpr = Some(b.fpr);
                r.roc_auc = Some(metrics::roc_auc(&scores, &truth));
                r.dr_at_1_5 = Some(dr_at_fpr(&scores, &truth, 0.015));
            }
        }
        log(Progress::Step(&match (&r.error, r.detection_rate) {
            (Some(e), _) => format!("site {i} alone: cannot stand alone ({e})"),
            (None, dr) => format!("site {i} alone: test DR {:.4} at FPR {:.2} % (DR {:.4} at test FPR <= 1.5 %)", dr.unwrap_or(0.0), 100.0 * r.fpr.unwrap_or(0.0), r.dr_at_1_5.unwrap_or(0.0)),
        }));
        out.push(r);
    }
    Ok(out)
}
