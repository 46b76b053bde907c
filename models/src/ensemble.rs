//! The ensemble: feature standardiser, the member models, and a stacked logistic
//! regression (learned on validation data) that turns the members' scores into one
//! calibrated attack probability, with a threshold set for a target FPR.

use serde::{Deserialize, Serialize};

use crate::forest::Forest;
use crate::lstm::LstmModel;
use crate::svm::Svm;
pub use crate::metrics::FprInterval;
use crate::ModelError;

/// Largest |z| a standardised feature may take (tames heavy tails and keeps every
/// model's input in a sane range).
pub(crate) const CLIP: f64 = 8.0;

/// Per-feature centring and scaling fitted on training rows. NaN (missing) maps to 0
/// (the training mean).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Standardizer {
    pub mean: Vec<f64>,
    pub sd: Vec<f64>,
}

impl Standardizer {
    /// Fit on `rows` (row-major, `cols` wide), skipping non-finite values.
    pub fn fit(values: &[f64], cols: usize) -> Standardizer {
        crate::federated::stats::Moments::of(values, cols).standardizer()
    }

    pub fn cols(&self) -> usize {
        self.mean.len()
    }

    /// Standardise one row into `out`.
    pub fn apply(&self, row: &[f64], out: &mut [f32]) {
        crate::vector::standardize(row, &self.mean, &self.sd, CLIP, out);
    }

    /// Standardise many rows.
    pub fn apply_all(&self, values: &[f64]) -> crate::Matrix {
        let cols = self.cols();
        let rows = values.len() / cols;
        let mut m = crate::Matrix::zeros(rows, cols);
        for r in 0..rows {
            self.apply(&values[r * cols..(r + 1) * cols], m.row_mut(r));
        }
        m
    }
}

/// Names of the ensemble members, in stacking-input order.
/// (The boosted member comes last, so a model stored before it existed, with four
/// stacking weights, scores as it did.)
pub const MEMBERS: [&str; 5] = ["rf", "svm", "lstm", "twin", "gbdt"];
/// Number of members ([`MEMBERS`]).
const N: usize = MEMBERS.len();

/// Logistic regression over the members' (transformed) scores; or, with `any`,
/// the "any member" combination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Stacker {
    pub weights: Vec<f64>,
    pub bias: f64,
    /// The "any member" combination when not empty (`train --combine any`): per
    /// member (in [`MEMBERS`] order) the stacking input (log-odds; the SVM's
    /// margin) at which its own threshold sits, `None` for a member left out. The
    /// score is σ(max over members of input − offset): an event is as suspicious
    /// as its most suspicious member, each measured against its own threshold, so
    /// evading it means evading every member at once. `weights` and `bias` are
    /// then unused.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub any: Vec<Option<f64>>,
}

fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-4, 1.0 - 1e-4);
    (p / (1.0 - p)).ln()
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Member scores of one event.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
pub struct MemberScores {
    /// Random forest P(attack).
    pub rf: f64,
    /// SVM decision value (positive = attack side).
    pub svm: f64,
    /// LSTM P(attack), stepped on the device's recurrent state.
    pub lstm: f64,
    /// Twin behavioural score in [0, 1).
    pub twin: f64,
    /// Gradient-boosted trees P(attack); 0.5 (no say) for a model without them.
    #[serde(default = "half")]
    pub gbdt: f64,
}

fn half() -> f64 {
    0.5
}

impl MemberScores {
    /// The stacking inputs: log-odds for probabilities, the raw SVM margin.
    pub fn inputs(&self) -> [f64; N] {
        [logit(self.rf), self.svm.clamp(-10.0, 10.0), logit(self.lstm), logit(self.twin), logit(self.gbdt)]
    }
    pub fn get(&self, member: &str) -> f64 {
        match member {
            "rf" => self.rf,
            "svm" => self.svm,
            "lstm" => self.lstm,
            "gbdt" => self.gbdt,
            _ => self.twin,
        }
    }
}

/// Sums of one Newton step of the stacker's fit over some rows: gradient and
/// Hessian of the class-weighted log-loss at the current weights (a weight per
/// member, then the bias). Sums over disjoint rows add up to the sums over their
/// union, which is what makes the fit exactly federable: sites send these, the
/// aggregator adds them and takes the step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewtonSums {
    pub g: Vec<f64>,
    /// Row-major `(N+1)×(N+1)`.
    pub h: Vec<f64>,
}

impl NewtonSums {
    pub fn zero() -> NewtonSums {
        NewtonSums { g: vec![0.0; N + 1], h: vec![0.0; (N + 1) * (N + 1)] }
    }
    /// Add another part's sums.
    pub fn add(&mut self, o: &NewtonSums) {
        for (a, b) in self.g.iter_mut().zip(&o.g) {
            *a += b;
        }
        for (a, b) in self.h.iter_mut().zip(&o.h) {
            *a += b;
        }
    }
}

/// Balanced class weights `(attack, normal)` for `pos` attack rows of `total`.
pub fn class_weights(pos: usize, total: usize) -> (f64, f64) {
    (total as f64 / (2.0 * pos as f64), total as f64 / (2.0 * (total - pos) as f64))
}

impl Stacker {
    /// Fit by Newton's method with a small L2 penalty, with balanced class weights
    /// (so a rare attack class still moves the fit).
    pub fn fit(members: &[MemberScores], y: &[bool], l2: f64) -> Result<Stacker, ModelError> {
        let pos = y.iter().filter(|&&l| l).count();
        if pos == 0 || pos == y.len() {
            return Err(ModelError::Data("the stacking (validation) set needs both normal and attack rows".into()));
        }
        let cw = class_weights(pos, y.len());
        let mut w = vec![0.0f64; N + 1];
        for _ in 0..50 {
            let sums = Stacker::newton_sums(members, y, &w, cw);
            if Stacker::newton_step(&mut w, sums, l2)? < 1e-8 {
                break;
            }
        }
        Ok(Stacker::from_vector(&w))
    }

    /// The stacker of a weight vector (a weight per member, then the bias).
    pub fn from_vector(w: &[f64]) -> Stacker {
        Stacker { weights: w[..N].to_vec(), bias: w[N], any: Vec::new() }
    }

    /// Newton sums over these rows at weights `w`, class weights `cw` (attack,
    /// normal) — from the counts of all the rows the fit is over, not just these.
    pub fn newton_sums(members: &[MemberScores], y: &[bool], w: &[f64], (wpos, wneg): (f64, f64)) -> NewtonSums {
        const K: usize = N + 1;
        let mut g = [0.0f64; K];
        let mut h = [[0.0f64; K]; K];
        for (m, &l) in members.iter().zip(y) {
            let mut xb = [1.0; K];
            xb[..N].copy_from_slice(&m.inputs());
            let z: f64 = (0..K).map(|i| w[i] * xb[i]).sum();
            let p = sigmoid(z);
            let sw = if l { wpos } else { wneg };
            let r = sw * (p - f64::from(u8::from(l)));
            let q = sw * p * (1.0 - p);
            for i in 0..K {
                g[i] += r * xb[i];
                for j in 0..K {
                    h[i][j] += q * xb[i] * xb[j];
                }
            }
        }
        NewtonSums { g: g.to_vec(), h: h.iter().flatten().copied().collect() }
    }

    /// Take one Newton step from summed sums (the L2 penalty on the member
    /// weights is added here, once); returns the largest change of a weight.
    pub fn newton_step(w: &mut [f64], sums: NewtonSums, l2: f64) -> Result<f64, ModelError> {
        const K: usize = N + 1;
        let mut g = [0.0f64; K];
        let mut h = [[0.0f64; K]; K];
        g.copy_from_slice(&sums.g);
        for (i, row) in h.iter_mut().enumerate() {
            row.copy_from_slice(&sums.h[i * K..(i + 1) * K]);
        }
        for i in 0..N {
            g[i] += l2 * w[i];
            h[i][i] += l2;
        }
        h[N][N] += 1e-9;
        let step = solve(h, g).ok_or_else(|| ModelError::Train("stacking regression is singular".into()))?;
        let mut delta = 0.0f64;
        for i in 0..K {
            w[i] -= step[i];
            delta = delta.max(step[i].abs());
        }
        Ok(delta)
    }

    /// Attack probability from the members' scores.
    pub fn predict(&self, m: &MemberScores) -> f64 {
        let x = m.inputs();
        if !self.any.is_empty() {
            let z = self.any.iter().zip(x).filter_map(|(o, v)| o.map(|o| v - o)).fold(f64::NEG_INFINITY, f64::max);
            return sigmoid(z);
        }
        sigmoid(self.bias + self.weights.iter().zip(x).map(|(w, v)| w * v).sum::<f64>())
    }

    /// The "any member" combination over the members with an offset (see `any`).
    pub fn any_member(offsets: Vec<Option<f64>>) -> Stacker {
        Stacker { weights: vec![0.0; N], bias: 0.0, any: offsets }
    }
}

/// Solve `h · x = g` (small dense system) by Gaussian elimination with pivoting.
fn solve<const K: usize>(mut h: [[f64; K]; K], mut g: [f64; K]) -> Option<[f64; K]> {
    for c in 0..K {
        let p = (c..K).max_by(|&a, &b| h[a][c].abs().total_cmp(&h[b][c].abs()))?;
        if h[p][c].abs() < 1e-12 {
            return None;
        }
        h.swap(c, p);
        g.swap(c, p);
        for r in c + 1..K {
            let f = h[r][c] / h[c][c];
            for k in c..K {
                h[r][k] -= f * h[c][k];
            }
            g[r] -= f * g[c];
        }
    }
    let mut x = [0.0; K];
    for c in (0..K).rev() {
        let s: f64 = (c + 1..K).map(|k| h[c][k] * x[k]).sum();
        x[c] = (g[c] - s) / h[c][c];
    }
    Some(x)
}

/// One candidate's out-of-fold figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    /// "stack" or a member's name.
    pub name: String,
    pub detection_rate: f64,
    pub fpr: f64,
}

/// What the artifact records about the combination and its threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Combination {
    /// "stack" or the member used alone.
    pub chosen: String,
    pub folds: usize,
    pub candidates: Vec<Candidate>,
    /// The threshold's false-positive rate on new normal events (see
    /// [`crate::metrics::fpr_interval`]).
    pub threshold_fpr: FprInterval,
    /// Each member's own threshold for the same target, set on the same
    /// validation rows (reports compare members at these).
    #[serde(default)]
    pub member_thresholds: std::collections::BTreeMap<String, f64>,
    /// A federation's sites by name, each with the threshold set from its own
    /// validation rows alone ([`Ensemble::use_site_threshold`]); empty for a
    /// central model and for a private federation.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub site_thresholds: std::collections::BTreeMap<String, crate::federated::calibrate::SiteThreshold>,
}


/// Everything needed to score a standardised feature row.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Ensemble {
    pub standardizer: Standardizer,
    pub forest: Forest,
    pub svm: Svm,
    pub lstm: LstmModel,
    /// The boosted member (absent in models stored before it existed).
    #[serde(default)]
    pub boost: Option<crate::boost::Booster>,
    pub stacker: Stacker,
    /// Index of the feature holding the twin's behavioural distance, if any; its
    /// score `d²/(d²+T²)` is the twin member.
    pub twin_feature: Option<usize>,
    /// The twin's anomaly threshold distance T.
    pub twin_threshold: f64,
    /// Ensemble probability at or above which an event is an attack.
    pub threshold: f64,
    /// Class names of the forest (index 0 = normal).
    pub classes: Vec<String>,
    /// Ensemble scores of the validation rows (normal, attack), sorted: lets a
    /// deployment re-derive the threshold for another target FPR without retraining.
    #[serde(default)]
    pub validation_normal: Vec<f32>,
    #[serde(default)]
    pub validation_attack: Vec<f32>,
    /// How the members were combined (chosen out of fold) and the threshold's
    /// false-positive law; absent in artifacts from before it was recorded.
    #[serde(default)]
    pub combination: Option<Combination>,
    /// A federated model's merged histogram of validation ensemble scores (log-odds
    /// bins), in place of any site's raw scores: what `recalibrate` reads then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration: Option<crate::federated::calibrate::ScoreHistogram>,
}

/// Scores of one event.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Scored {
    pub members: MemberScores,
    pub ensemble: f64,
    pub attack: bool,
    /// Most probable attack class (never 0 = normal), from the forest.
    pub class: usize,
}

/// Reusable buffers for scoring (no allocation per event).
#[derive(Debug, Default)]
pub struct Scratch {
    row: Vec<f32>,
    proba: Vec<f32>,
}

/// A batch's stateless work, done once for all its events: the standardised rows,
/// the forest's class probabilities and the booster's scores (see
/// [`Ensemble::prepare`]); reused from batch to batch.
#[derive(Debug, Default)]
pub struct Prepared {
    rows: Vec<f32>,
    proba: Vec<f32>,
    gbdt: Vec<f32>,
}

impl Ensemble {
    /// Fitted members not yet combined: the stacker all zeros and the threshold
    /// 0.5 until the combination step sets them; the twin member reads the
    /// `behaviour_distance` feature when `names` has it.
    #[allow(clippy::too_many_arguments)]
    pub fn uncombined(
        standardizer: Standardizer,
        forest: crate::forest::Forest,
        svm: crate::svm::Svm,
        lstm: crate::lstm::LstmModel,
        boost: Option<crate::boost::Booster>,
        names: &[String],
        twin_threshold: f64,
        classes: Vec<String>,
    ) -> Ensemble {
        Ensemble {
            standardizer,
            forest,
            svm,
            lstm,
            boost,
            stacker: Stacker { weights: vec![0.0; MEMBERS.len()], bias: 0.0, any: Vec::new() },
            twin_feature: names.iter().position(|n| n == "behaviour_distance"),
            twin_threshold,
            threshold: 0.5,
            classes,
            validation_normal: Vec::new(),
            validation_attack: Vec::new(),
            combination: None,
            calibration: None,
        }
    }

    /// Re-derive the decision threshold for `target_fpr` from the stored validation
    /// scores (as training did for its own target). Fails when the model carries none.
    pub fn recalibrate(&mut self, target_fpr: f64) -> Result<(), ModelError> {
        if !(target_fpr > 0.0 && target_fpr < 1.0) {
            return Err(ModelError::Param { name: "target_fpr", why: format!("{target_fpr} is not in (0, 1)") });
        }
        if self.validation_normal.is_empty() {
            if let Some(h) = &self.calibration {
                self.threshold = crate::federated::calibrate::sigmoid(h.threshold_for_fpr(target_fpr)?);
                return Ok(());
            }
            return Err(ModelError::Artifact("the model stores no validation scores to recalibrate from; retrain it".into()));
        }
        let n: Vec<f64> = self.validation_normal.iter().map(|&x| f64::from(x)).collect();
        let a: Vec<f64> = self.validation_attack.iter().map(|&x| f64::from(x)).collect();
        self.threshold = crate::metrics::calibrate_threshold(&n, &a, target_fpr);
        Ok(())
    }

    /// Score at federation site `site`'s own threshold instead of the
    /// federation's; returns what was chosen, for the log. A site too small to
    /// set its own keeps the federation's (and the note says so); a name the
    /// federation does not know, or a model without per-site thresholds, is an
    /// error naming what there is.
    pub fn use_site_threshold(&mut self, site: &str) -> Result<String, ModelError> {
        let sites = self.combination.as_ref().map(|c| &c.site_thresholds).filter(|s| !s.is_empty());
        let Some(sites) = sites else {
            return Err(ModelError::Artifact(format!(
                "the model carries no per-site thresholds (trained centrally, privately or before they existed): there is no threshold of site `{site}` to use"
            )));
        };
        let Some(own) = sites.get(site) else {
            let names: Vec<&str> = sites.keys().map(String::as_str).collect();
            return Err(ModelError::Param { name: "site", why: format!("`{site}` is not a site of this federation (its sites: {})", names.join(", ")) });
        };
        let f = &own.fpr;
        Ok(match own.threshold {
            Some(t) => {
                self.threshold = t;
                format!("site `{site}`'s own threshold {t:.4} ({} of its {} normal validation rows above)", f.above, f.normals)
            }
            None => format!("site `{site}` has {} normal validation rows, too few to set its own threshold: the federation's {:.4}", f.normals, self.threshold),
        })
    }

    /// Twin member score from a raw (unstandardised) feature row.
    pub fn twin_score(&self, raw: &[f64]) -> f64 {
        match self.twin_feature {
            Some(i) if raw[i].is_finite() => {
                let d2 = raw[i] * raw[i];
                d2 / (d2 + self.twin_threshold * self.twin_threshold)
            }
            _ => 0.0,
        }
    }

    /// Score one raw feature row; steps the device's LSTM `state` (resized and
    /// zeroed if it does not fit this model).
    pub fn score(&self, raw: &[f64], state: &mut Vec<f32>, s: &mut Scratch) -> Scored {
        s.row.resize(self.standardizer.cols(), 0.0);
        self.standardizer.apply(raw, &mut s.row);
        s.proba.resize(self.forest.n_classes(), 0.0);
        self.forest.predict_proba_row(&s.row, &mut s.proba);
        let gbdt = self.boost.as_ref().map_or(0.5, |b| f64::from(b.predict_row(&s.row)));
        self.finish(raw, &s.row, &s.proba, gbdt, state)
    }

    /// The stateless part of [`score`](Self::score) for a batch of raw rows
    /// (row-major): standardised once, the trees walked tree by tree over all the
    /// rows (a tree's nodes stay in cache). Then [`score_prepared`](Self::score_prepared)
    /// per event, in order, gives the same bits as `score`.
    pub fn prepare(&self, raw: &[f64], p: &mut Prepared) {
        let cols = self.standardizer.cols();
        let n = raw.len() / cols.max(1);
        p.rows.resize(n * cols, 0.0);
        for (r, o) in raw.chunks_exact(cols).zip(p.rows.chunks_exact_mut(cols)) {
            self.standardizer.apply(r, o);
        }
        p.proba.resize(n * self.forest.n_classes(), 0.0);
        self.forest.predict_proba_rows(&p.rows, &mut p.proba);
        p.gbdt.resize(n, 0.5);
        match &self.boost {
            Some(b) => b.predict_rows(&p.rows, &mut p.gbdt),
            None => p.gbdt.fill(0.5),
        }
    }

    /// Score event `i` of a [`prepare`](Self::prepare)d batch (`raw`: its raw row);
    /// steps the device's LSTM `state`.
    pub fn score_prepared(&self, i: usize, raw: &[f64], state: &mut Vec<f32>, p: &Prepared) -> Scored {
        let (c, k) = (self.standardizer.cols(), self.forest.n_classes());
        let gbdt = if self.boost.is_some() { f64::from(p.gbdt[i]) } else { 0.5 };
        self.finish(raw, &p.rows[i * c..(i + 1) * c], &p.proba[i * k..(i + 1) * k], gbdt, state)
    }

    /// The per-event rest: SVM, one LSTM step, the twin member, stacking.
    fn finish(&self, raw: &[f64], row: &[f32], proba: &[f32], gbdt: f64, state: &mut Vec<f32>) -> Scored {
        let rf = f64::from(1.0 - proba[0]);
        let class = (1..proba.len()).max_by(|&a, &b| proba[a].total_cmp(&proba[b])).unwrap_or(0);
        let svm = f64::from(self.svm.decision_row(row));
        if state.len() != self.lstm.state_len() {
            state.clear();
            state.resize(self.lstm.state_len(), 0.0);
        }
        let lstm = f64::from(self.lstm.step(row, state));
        let members = MemberScores { rf, svm, lstm, twin: self.twin_score(raw), gbdt };
        let ensemble = self.stacker.predict(&members);
        Scored { members, ensemble, attack: ensemble >= self.threshold, class }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standardizer_centres_scales_and_imputes() {
        let v = [1.0, f64::NAN, 3.0, 10.0, 5.0, 10.0];
        let s = Standardizer::fit(&v, 2);
        assert_eq!(s.mean, vec![3.0, 10.0]);
        assert_eq!(s.sd[1], 1.0, "constant column keeps unit scale");
        let mut out = [0.0f32; 2];
        s.apply(&[f64::NAN, 12.0], &mut out);
        assert_eq!(out, [0.0, 2.0]);
    }

    #[test]
    fn stacker_learns_to_trust_the_informative_member() {
        // rf separates the classes, svm is noise.
        let mut m = Vec::new();
        let mut y = Vec::new();
        for i in 0..400 {
            let attack = i % 4 == 0;
            let noise = f64::from((i * 37 % 100) as u32) / 100.0;
            let other = f64::from(((i * 53 + 17) % 97) as u32) / 97.0;
            m.push(MemberScores { rf: if attack { 0.45 + noise * 0.5 } else { 0.05 + noise * 0.5 }, svm: other - 0.5, lstm: 0.5, twin: 0.5, gbdt: 0.5 });
            y.push(attack);
        }
        let s = Stacker::fit(&m, &y, 1e-3).unwrap();
        assert!(s.weights[0] > 1.0, "rf weight {:?}", s.weights);
        assert!(s.weights[1].abs() < s.weights[0] / 4.0, "svm weight {:?}", s.weights);
        let hi = s.predict(&MemberScores { rf: 0.9, svm: 0.0, lstm: 0.5, twin: 0.5, gbdt: 0.5 });
        let lo = s.predict(&MemberScores { rf: 0.1, svm: 0.0, lstm: 0.5, twin: 0.5, gbdt: 0.5 });
        assert!(hi > 0.9 && lo < 0.1, "{hi} {lo}");
    }

    #[test]
    fn stacker_refuses_one_class() {
        let m = vec![MemberScores::default(); 3];
        assert!(Stacker::fit(&m, &[false, false, false], 1e-3).is_err());
    }
}
