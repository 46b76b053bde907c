//! Binary SVM (attack vs normal) trained with `linfa-svm` (SMO, C-SVC) and scored with
//! our own representation.
//!
//! linfa-svm 0.8.1's fitted `Svm` keeps its support vectors private
//! (`sep_hyperplane`), but exposes `alpha` (one signed coefficient `y_i·α_i` per
//! training row, 0 for non-support rows) and `rho`. Its decision value is
//! `Σ_{|alpha_i| > 100·ε} alpha_i · K(x_i, x) − rho` (`Svm::weighted_sum(x) − rho`),
//! so we rebuild the support set from the training rows with the same threshold.
//! linfa's Gaussian kernel is `exp(−‖x−x'‖² / eps)`, i.e. `eps = 1/gamma`.
//!
//! Inference cost per row: Linear `cols` multiply-adds; RBF `support_vectors × cols`.

use linfa::prelude::Fit;
use linfa::DatasetBase;
use rand::rngs::StdRng;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::{Matrix, ModelError};

/// SVM kernel.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Kernel {
    /// `K(a, b) = a·b`.
    Linear,
    /// `K(a, b) = exp(−gamma ‖a − b‖²)`. `gamma <= 0` means `1 / cols` (scikit-learn's
    /// "scale" for standardized features).
    Rbf { gamma: f32 },
}

/// Hyper-parameters of [`Svm::fit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct SvmParams {
    pub kernel: Kernel,
    /// Soft-margin penalty C (> 0), the same for both classes.
    pub c: f32,
    /// Train on at most this many rows: a stratified (per-class proportional) seeded
    /// random subsample. The SMO solver keeps a dense `n × n` kernel matrix.
    pub max_train_rows: usize,
    pub seed: u64,
}

/// Linear by default: an RBF machine costs `support_vectors × cols` per event (~55 µs
/// for WUSTL's 759 × 174), which alone would cap the ensemble far below its 50,000
/// events/s goal; a linear one costs `cols` multiply-adds.
impl Default for SvmParams {
    fn default() -> Self {
        SvmParams { kernel: Kernel::Linear, c: 1.0, max_train_rows: 3000, seed: 42 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Repr {
    /// `w·x − rho`.
    Linear { w: Vec<f32> },
    /// `Σ coef_i exp(−gamma ‖sv_i − x‖²) − rho`, `sv` row-major `n_sv × cols`.
    Rbf { gamma: f32, sv: Vec<f32>, coef: Vec<f32> },
}

/// A trained binary SVM. Decision value > 0 = attack.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Svm {
    cols: usize,
    rho: f32,
    n_sv: usize,
    repr: Repr,
}

fn param_err(name: &'static str, why: impl Into<String>) -> ModelError {
    ModelError::Param { name, why: why.into() }
}

/// Stratified seeded subsample of at most `max` row indices (sorted).
fn stratified_subsample(y: &[bool], max: usize, seed: u64) -> Vec<usize> {
    if y.len() <= max {
        return (0..y.len()).collect();
    }
    let mut rng = StdRng::seed_from_u64(seed);
    let pos: Vec<usize> = (0..y.len()).filter(|&i| y[i]).collect();
    let neg: Vec<usize> = (0..y.len()).filter(|&i| !y[i]).collect();
    // proportional share, but at least one row of each class
    let mut n_pos = ((max as f64) * pos.len() as f64 / y.len() as f64).round() as usize;
    n_pos = n_pos.clamp(1, max - 1).min(pos.len());
    let n_neg = (max - n_pos).min(neg.len());
    let mut out: Vec<usize> = rand::seq::index::sample(&mut rng, pos.len(), n_pos).iter().map(|i| pos[i]).collect();
    out.extend(rand::seq::index::sample(&mut rng, neg.len(), n_neg).iter().map(|i| neg[i]));
    out.sort_unstable();
    out
}

impl Svm {
    /// Trains a C-SVC on `x` with labels `y` (true = attack) with linfa-svm, then
    /// converts it. Deterministic for a given seed (the subsample is the only
    /// randomness).
    ///
    /// Errors: empty set, `y.len() != x.rows`, only one class, bad parameters, or a
    /// solver failure.
    pub fn fit(x: &Matrix, y: &[bool], params: &SvmParams) -> Result<Svm, ModelError> {
        if x.rows == 0 || x.cols == 0 {
            return Err(ModelError::Data(format!("empty training set ({} rows × {} columns)", x.rows, x.cols)));
        }
        if y.len() != x.rows {
            return Err(ModelError::Data(format!("{} labels for {} rows", y.len(), x.rows)));
        }
        if y.iter().all(|&b| b) || y.iter().all(|&b| !b) {
            return Err(ModelError::Data("only one class in the training labels".into()));
        }
        if !(params.c > 0.0 && params.c.is_finite()) {
            return Err(param_err("c", format!("{} is not a positive finite number", params.c)));
        }
        if params.max_train_rows < 2 {
            return Err(param_err("max_train_rows", "must be at least 2"));
        }
        let gamma = match params.kernel {
            Kernel::Linear => None,
            Kernel::Rbf { gamma } if !gamma.is_finite() => {
                return Err(param_err("kernel.gamma", format!("{gamma} is not finite")))
            }
            Kernel::Rbf { gamma } if gamma <= 0.0 => Some(1.0 / x.cols as f32),
            Kernel::Rbf { gamma } => Some(gamma),
        };

        let idx = stratified_subsample(y, params.max_train_rows, params.seed);
        let sub = x.select(&idx);
        let records = sub.to_ndarray_f64();
        let targets = ndarray::Array1::from_iter(idx.iter().map(|&i| y[i]));
        let dataset = DatasetBase::new(records, targets);
        let c = f64::from(params.c);
        let base = linfa_svm::Svm::<f64, bool>::params().pos_neg_weights(c, c).eps(1e-3);
        let base = match gamma {
            None => base.linear_kernel(),
            Some(g) => base.gaussian_kernel(1.0 / f64::from(g)),
        };
        let model = base.fit(&dataset).map_err(|e| ModelError::Train(format!("linfa-svm: {e}")))?;
        Ok(Self::from_linfa(&model, &sub, gamma))
    }

    /// Converts a linfa model trained on `train` (same rows, same order).
    fn from_linfa(model: &linfa_svm::Svm<f64, bool>, train: &Matrix, gamma: Option<f32>) -> Svm {
        let cols = train.cols;
        let thresh = 100.0 * f64::EPSILON; // linfa's own support-vector cut-off
        let support: Vec<usize> = (0..train.rows).filter(|&i| model.alpha[i].abs() > thresh).collect();
        let repr = match gamma {
            None => {
                let mut w = vec![0f64; cols];
                for &i in &support {
                    for (wj, &xj) in w.iter_mut().zip(train.row(i)) {
                        *wj += model.alpha[i] * f64::from(xj);
                    }
                }
                Repr::Linear { w: w.into_iter().map(|v| v as f32).collect() }
            }
            Some(gamma) => Repr::Rbf {
                gamma,
                sv: train.select(&support).data,
                coef: support.iter().map(|&i| model.alpha[i] as f32).collect(),
            },
        };
        Svm { cols, rho: model.rho as f32, n_sv: support.len(), repr }
    }

    /// Signed decision value for one row (positive = attack).
    ///
    /// Panics when `row.len()` differs from the training columns.
    pub fn decision_row(&self, row: &[f32]) -> f32 {
        assert_eq!(row.len(), self.cols, "row length does not match the SVM's features");
        match &self.repr {
            Repr::Linear { w } => w.iter().zip(row).map(|(a, b)| a * b).sum::<f32>() - self.rho,
            Repr::Rbf { gamma, sv, coef } => {
                let mut acc = 0f32;
                for (s, &c) in sv.chunks_exact(self.cols).zip(coef) {
                    let d2: f32 = s.iter().zip(row).map(|(a, b)| (a - b) * (a - b)).sum();
                    acc += c * (-gamma * d2).exp();
                }
                acc - self.rho
            }
        }
    }

    /// [`Svm::decision_row`] for every row.
    pub fn decisions(&self, x: &Matrix) -> Vec<f32> {
        (0..x.rows).map(|i| self.decision_row(x.row(i))).collect()
    }

    /// A linear SVM's hyperplane as one vector, `w` then `rho` (what a federation
    /// averages); `None` for a kernel SVM, whose support vectors are training rows
    /// and never leave a site.
    pub fn hyperplane(&self) -> Option<Vec<f64>> {
        match &self.repr {
            Repr::Linear { w } => Some(w.iter().map(|&v| f64::from(v)).chain([f64::from(self.rho)]).collect()),
            Repr::Rbf { .. } => None,
        }
    }

    /// The linear SVM of a hyperplane vector (`w` then `rho`, as [`Svm::hyperplane`]).
    pub fn from_hyperplane(v: &[f64]) -> Result<Svm, ModelError> {
        if v.len() < 2 || v.iter().any(|x| !x.is_finite()) {
            return Err(ModelError::Data(format!("a hyperplane needs at least one weight and a finite rho ({} values)", v.len())));
        }
        let (w, rho) = v.split_at(v.len() - 1);
        Ok(Svm { cols: w.len(), rho: rho[0] as f32, n_sv: 0, repr: Repr::Linear { w: w.iter().map(|&x| x as f32).collect() } })
    }

    /// Number of support vectors (training rows with a non-zero dual coefficient).
    pub fn support_vectors(&self) -> usize {
        self.n_sv
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Attack when the point lies outside a circle of radius 1.2 (not linearly separable)
    /// or, for `linear`, when x0 + x1 > 0.3.
    fn synthetic(rows: usize, cols: usize, linear: bool, seed: u64) -> (Matrix, Vec<bool>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Matrix::zeros(rows, cols);
        let mut y = Vec::new();
        for i in 0..rows {
            let r = x.row_mut(i);
            for v in r.iter_mut() {
                *v = rng.random_range(-2.0f32..2.0);
            }
            y.push(if linear { r[0] + r[1] > 0.3 } else { r[0] * r[0] + r[1] * r[1] > 1.44 });
        }
        (x, y)
    }

    fn accuracy(s: &Svm, x: &Matrix, y: &[bool]) -> f64 {
        s.decisions(x).iter().zip(y).filter(|(d, &t)| (**d > 0.0) == t).count() as f64 / y.len() as f64
    }

    #[test]
    fn own_decision_equals_linfa() {
        for kernel in [Kernel::Linear, Kernel::Rbf { gamma: 0.5 }] {
            let (x, y) = synthetic(300, 4, matches!(kernel, Kernel::Linear), 1);
            let gamma = match kernel {
                Kernel::Linear => None,
                Kernel::Rbf { gamma } => Some(gamma),
            };
            let ds = DatasetBase::new(x.to_ndarray_f64(), ndarray::Array1::from_vec(y.clone()));
            let p = linfa_svm::Svm::<f64, bool>::params().pos_neg_weights(1.0, 1.0).eps(1e-3);
            let p = match gamma {
                None => p.linear_kernel(),
                Some(g) => p.gaussian_kernel(1.0 / f64::from(g)),
            };
            let lin = p.fit(&ds).unwrap();
            let ours = Svm::from_linfa(&lin, &x, gamma);
            assert_eq!(ours.support_vectors(), lin.nsupport());
            let (xt, _) = synthetic(50, 4, true, 2);
            for i in 0..xt.rows {
                let row = ndarray::Array1::from_iter(xt.row(i).iter().map(|&v| f64::from(v)));
                let theirs = lin.weighted_sum(&row) - lin.rho;
                let mine = f64::from(ours.decision_row(xt.row(i)));
                assert!((theirs - mine).abs() < 1e-3 * (1.0 + theirs.abs()), "{kernel:?} row {i}: {theirs} vs {mine}");
            }
        }
    }

    #[test]
    fn separates_synthetic_data() {
        let (x, y) = synthetic(800, 5, false, 3);
        let s = Svm::fit(&x, &y, &SvmParams { kernel: Kernel::Rbf { gamma: 0.0 }, max_train_rows: 600, ..SvmParams::default() }).unwrap();
        let (xt, yt) = synthetic(1000, 5, false, 4);
        let acc = accuracy(&s, &xt, &yt);
        assert!(acc > 0.9, "rbf accuracy {acc}");
        assert!(s.support_vectors() > 0 && s.support_vectors() <= 600);

        let (x, y) = synthetic(600, 5, true, 5);
        let s = Svm::fit(&x, &y, &SvmParams { kernel: Kernel::Linear, ..SvmParams::default() }).unwrap();
        let (xt, yt) = synthetic(1000, 5, true, 6);
        let acc = accuracy(&s, &xt, &yt);
        assert!(acc > 0.95, "linear accuracy {acc}");
        let json = serde_json::to_string(&s).unwrap();
        let back: Svm = serde_json::from_str(&json).unwrap();
        assert_eq!(back.decisions(&xt), s.decisions(&xt));
    }

    #[test]
    fn subsample_is_stratified_and_deterministic() {
        let y: Vec<bool> = (0..10_000).map(|i| i % 10 == 0).collect();
        let a = stratified_subsample(&y, 1000, 9);
        assert_eq!(a.len(), 1000);
        assert_eq!(a.iter().filter(|&&i| y[i]).count(), 100);
        assert_eq!(a, stratified_subsample(&y, 1000, 9));
        assert_ne!(a, stratified_subsample(&y, 1000, 10));
    }

    #[test]
    fn rejects_bad_input() {
        let (x, y) = synthetic(20, 3, true, 7);
        let e = |r: Result<Svm, ModelError>| r.unwrap_err().to_string();
        assert!(e(Svm::fit(&Matrix::zeros(0, 3), &[], &SvmParams::default())).contains("empty"));
        assert!(e(Svm::fit(&x, &y[1..], &SvmParams::default())).contains("labels"));
        assert!(e(Svm::fit(&x, &[true; 20], &SvmParams::default())).contains("one class"));
        assert!(e(Svm::fit(&x, &y, &SvmParams { c: 0.0, ..SvmParams::default() })).contains("c"));
    }

}
