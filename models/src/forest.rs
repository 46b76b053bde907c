//! Random forest (multi-class, class 0 = normal) trained with `linfa-trees` and scored
//! with our own flat tree representation.
//!
//! # Why linfa-trees orchestrated here, not `linfa_ensemble::RandomForest`
//! linfa-ensemble 0.8.1 does ship a `RandomForest` (= `EnsembleLearner<DecisionTree>`),
//! but it (a) draws the feature subset once per *tree* like we do, (b) predicts by
//! majority vote only, (c) `unwrap()`s each tree's fit (a failing tree panics instead
//! of returning an error), (d) fits all trees in one call (no progress), (e) takes a
//! rand 0.8 RNG (the workspace is on rand 0.9) and (f) drops the bootstrap indices,
//! which we need to recover leaf class distributions. So we run the same algorithm
//! ourselves over `linfa_trees::DecisionTree`: per tree a seeded bootstrap sample and
//! a seeded feature subset (`feature_fraction` of the columns, **per tree**: linfa-trees
//! always scans every column it is given at every split, so per-split subsampling is
//! impossible with it), optional balanced class weights (linfa-trees honours
//! `Dataset::with_weights`), then convert the tree into flat arrays.
//!
//! linfa-trees leaves only store their majority label; the leaf class distributions
//! are recovered by routing the tree's own (weighted) bootstrap sample through the
//! converted tree. Thresholds are rounded so that `x <= thr` in f32 is exactly the
//! training-time test `x as f64 <= split` of linfa (which trains with `<=` but
//! predicts with `<`; both agree because splits are midpoints between distinct
//! training values).
//!
//! Training is reproducible up to linfa-trees' own tie-breaking: it sums the Gini
//! impurity over a `HashMap` (random iteration order per process), so two fits with
//! the same seed can pick different ones of two near-equal splits. Scoring a trained
//! forest is exact and deterministic.
use linfa::prelude::Fit;
use linfa::DatasetBase;
use linfa_trees::{DecisionTree, TreeNode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::{Matrix, ModelError};

const LEAF: u32 = u32::MAX;

/// Hyper-parameters of [`Forest::fit`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default)]
pub struct ForestParams {
    /// Number of trees (≥ 1).
    pub trees: usize,
    /// Maximum depth of each tree (≥ 1).
    pub max_depth: usize,
    /// Minimum (weighted) number of samples in a leaf (≥ 1).
    pub min_samples_leaf: usize,
    /// Fraction of the columns each tree sees, drawn once per tree (random subspace),
    /// in (0, 1]. At least one column.
    pub feature_fraction: f32,
    /// Bootstrap sample size as a fraction of the rows, drawn with replacement, in (0, 1].
    pub sample_fraction: f32,
    /// Weight classes inversely to their frequency (`n / (k * n_c)`), like
    /// scikit-learn's `class_weight="balanced"`.
    pub balanced: bool,
    pub seed: u64,
}

impl Default for ForestParams {
    fn default() -> Self {
        ForestParams {
            trees: 100,
            max_depth: 16,
            min_samples_leaf: 1,
            feature_fraction: 0.3,
            sample_fraction: 1.0,
            balanced: false,
            seed: 42,
        }
    }
}

/// A trained random forest in flat form: all trees' nodes in one set of arrays.
///
/// Node `i` is internal when `feat[i] != u32::MAX`: go to `left[i]` when
/// `row[feat[i]] <= thr[i]`, else to `right[i]`. For a leaf, `left[i]` is the leaf
/// number `l` and its class distribution is `leaf_proba[l*n_classes..(l+1)*n_classes]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Forest {
    n_classes: usize,
    n_features: usize,
    roots: Vec<u32>,
    feat: Vec<u32>,
    thr: Vec<f32>,
    left: Vec<u32>,
    right: Vec<u32>,
    leaf_proba: Vec<f32>,
    importance: Vec<f32>,
}

fn param_err(name: &'static str, why: impl Into<String>) -> ModelError {
    ModelError::Param { name, why: why.into() }
}

/// A per-tree seed, decorrelated from the forest seed (SplitMix64 step).
fn tree_seed(seed: u64, tree: usize) -> u64 {
    let mut z = seed ^ (tree as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Largest f32 `t` with `t <= v`, so `x <= t` ⇔ `x as f64 <= v` for every f32 `x`.
fn f32_floor(v: f64) -> f32 {
    let t = v as f32;
    if f64::from(t) > v {
        t.next_down()
    } else {
        t
    }
}

impl Forest {
    /// Trains `params.trees` trees on `x` (rows × features) with labels `y`
    /// (`y[i] < n_classes`, class 0 = normal). Deterministic for a given seed.
    /// `progress(done, total)` is called after each tree.
    ///
    /// Errors: empty set, `y.len() != x.rows`, a label `>= n_classes`, fewer than two
    /// classes present, or parameters out of range.
    pub fn fit(
        x: &Matrix,
        y: &[usize],
        n_classes: usize,
        params: &ForestParams,
        progress: &mut dyn FnMut(usize, usize),
    ) -> Result<Forest, ModelError> {
        if x.rows == 0 || x.cols == 0 {
            return Err(ModelError::Data(format!("empty training set ({} rows × {} columns)", x.rows, x.cols)));
        }
        if y.len() != x.rows {
            return Err(ModelError::Data(format!("{} labels for {} rows", y.len(), x.rows)));
        }
        if n_classes < 2 {
            return Err(param_err("n_classes", format!("need at least 2 classes, got {n_classes}")));
        }
        if let Some((i, &c)) = y.iter().enumerate().find(|(_, &c)| c >= n_classes) {
            return Err(ModelError::Data(format!("label {c} at row {i} is not below n_classes = {n_classes}")));
        }
        let mut counts = vec![0usize; n_classes];
        for &c in y {
            counts[c] += 1;
        }
        let present = counts.iter().filter(|&&n| n > 0).count();
        if present < 2 {
            return Err(ModelError::Data("only one class in the training labels".into()));
        }
        if params.trees == 0 {
            return Err(param_err("trees", "must be at least 1"));
        }
        if params.max_depth == 0 {
            return Err(param_err("max_depth", "must be at least 1"));
        }
        if params.min_samples_leaf == 0 {
            return Err(param_err("min_samples_leaf", "must be at least 1"));
        }
        if !(params.feature_fraction > 0.0 && params.feature_fraction <= 1.0) {
            return Err(param_err("feature_fraction", format!("{} is not in (0, 1]", params.feature_fraction)));
        }
        if !(params.sample_fraction > 0.0 && params.sample_fraction <= 1.0) {
            return Err(param_err("sample_fraction", format!("{} is not in (0, 1]", params.sample_fraction)));
        }

        let class_w: Vec<f32> = if params.balanced {
            let w: Vec<f32> =
                counts.iter().map(|&n| if n == 0 { 0.0 } else { x.rows as f32 / (present as f32 * n as f32) }).collect();
            // Scaled so the lightest present class weighs 1: linfa-trees' minimum
            // leaf/split weights then keep their "rows" meaning (weights below 1 let
            // it create empty-weight nodes, on which it panics).
            let min = w.iter().copied().filter(|&v| v > 0.0).fold(f32::INFINITY, f32::min);
            w.iter().map(|&v| v / min).collect()
        } else {
            vec![1.0; n_classes]
        };
        let n_sample = ((x.rows as f64 * f64::from(params.sample_fraction)).ceil() as usize).max(1);
        let n_feat = ((x.cols as f64 * f64::from(params.feature_fraction)).round() as usize).clamp(1, x.cols);
        let min_leaf = params.min_samples_leaf as f32;
        let tree_params = DecisionTree::<f64, usize>::params()
            .max_depth(Some(params.max_depth))
            .min_weight_leaf(min_leaf)
            .min_weight_split((2.0 * min_leaf).max(2.0));

        let mut forest = Forest {
            n_classes,
            n_features: x.cols,
            roots: Vec::with_capacity(params.trees),
            feat: Vec::new(),
            thr: Vec::new(),
            left: Vec::new(),
            right: Vec::new(),
            leaf_proba: Vec::new(),
            importance: vec![0.0; x.cols],
        };
        let mut importance = vec![0f64; x.cols];

        for t in 0..params.trees {
            let mut rng = StdRng::seed_from_u64(tree_seed(params.seed, t));
            let rows: Vec<usize> = (0..n_sample).map(|_| rng.random_range(0..x.rows)).collect();
            let mut cols = rand::seq::index::sample(&mut rng, x.cols, n_feat).into_vec();
            cols.sort_unstable();

            let records = ndarray::Array2::from_shape_fn((rows.len(), cols.len()), |(r, c)| {
                f64::from(x.data[rows[r] * x.cols + cols[c]])
            });
            let targets = ndarray::Array1::from_iter(rows.iter().map(|&r| y[r]));
            let mut dataset = DatasetBase::new(records, targets);
            if params.balanced {
                dataset = dataset.with_weights(ndarray::Array1::from_iter(rows.iter().map(|&r| class_w[y[r]])));
            }
            // linfa-trees asserts on some degenerate inputs; a panic there becomes an
            // error naming the tree instead of taking the process down.
            let fitted = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| tree_params.fit(&dataset)))
                .map_err(|p| {
                    let why = p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned());
                    ModelError::Train(format!("decision tree {t}: linfa-trees panicked: {}", why.unwrap_or_default()))
                })?;
            let tree = fitted.map_err(|e| ModelError::Train(format!("decision tree {t}: {e}")))?;

            // Flatten (pre-order), mapping column indices back to x's columns.
            let root = forest.feat.len();
            let mut splits: Vec<(usize, f64)> = Vec::new(); // (node, impurity decrease) of internal nodes
            let n_leaves = forest.leaf_proba.len() / n_classes;
            let mut leaf_label: Vec<usize> = Vec::new();
            forest.push_node(tree.root_node(), &cols, &mut splits, &mut leaf_label, n_leaves);
            forest.roots.push(root as u32);

            // Leaf distributions and node weights from the tree's own bootstrap sample.
            let n_nodes = forest.feat.len() - root;
            let mut node_w = vec![0f64; n_nodes];
            let mut leaf_w = vec![0f64; leaf_label.len() * n_classes];
            for &r in &rows {
                let row = x.row(r);
                let w = f64::from(class_w[y[r]]);
                let mut n = root;
                loop {
                    node_w[n - root] += w;
                    let f = forest.feat[n];
                    if f == LEAF {
                        leaf_w[(forest.left[n] as usize - n_leaves) * n_classes + y[r]] += w;
                        break;
                    }
                    n = if row[f as usize] <= forest.thr[n] { forest.left[n] } else { forest.right[n] } as usize;
                }
            }
            for (l, dist) in leaf_w.chunks(n_classes).enumerate() {
                let total: f64 = dist.iter().sum();
                if total > 0.0 {
                    forest.leaf_proba.extend(dist.iter().map(|&v| (v / total) as f32));
                } else {
                    // Unreachable in practice (every leaf holds training rows); fall back
                    // to the leaf's majority label.
                    forest.leaf_proba.extend((0..n_classes).map(|c| if c == leaf_label[l] { 1.0 } else { 0.0 }));
                }
            }
            // Mean decrease in impurity, weighted by the node's share of the sample.
            let total_w = node_w[0].max(f64::MIN_POSITIVE);
            let mut tree_imp = vec![0f64; x.cols];
            for &(n, dec) in &splits {
                tree_imp[forest.feat[n] as usize] += node_w[n - root] / total_w * dec.max(0.0);
            }
            let s: f64 = tree_imp.iter().sum();
            if s > 0.0 {
                for (acc, v) in importance.iter_mut().zip(&tree_imp) {
                    *acc += v / s;
                }
            }
            progress(t + 1, params.trees);
        }
        let s: f64 = importance.iter().sum();
        forest.importance = importance.iter().map(|&v| if s > 0.0 { (v / s) as f32 } else { 0.0 }).collect();
        Ok(forest)
    }

    /// Appends `node` and its subtree; returns its index.
    fn push_node(
        &mut self,
        node: &TreeNode<f64, usize>,
        cols: &[usize],
        splits: &mut Vec<(usize, f64)>,
        leaf_label: &mut Vec<usize>,
        leaf_base: usize,
    ) -> usize {
        let me = self.feat.len();
        let children = node.children();
        let (left, right) = match (children[0], children[1]) {
            (Some(l), Some(r)) if !node.is_leaf() => (l, r),
            _ => {
                self.feat.push(LEAF);
                self.thr.push(0.0);
                self.left.push((leaf_base + leaf_label.len()) as u32);
                self.right.push(0);
                leaf_label.push(node.prediction().unwrap_or(0));
                return me;
            }
        };
        let (f, split, dec) = node.split();
        self.feat.push(cols[f] as u32);
        self.thr.push(f32_floor(split));
        self.left.push(0);
        self.right.push(0);
        splits.push((me, dec));
        let l = self.push_node(left, cols, splits, leaf_label, leaf_base);
        let r = self.push_node(right, cols, splits, leaf_label, leaf_base);
        self.left[me] = l as u32;
        self.right[me] = r as u32;
        me
    }

    pub fn n_classes(&self) -> usize {
        self.n_classes
    }

    /// Number of features the forest was trained on.
    pub fn n_features(&self) -> usize {
        self.n_features
    }

    /// Total number of nodes over all trees.
    pub fn n_nodes(&self) -> usize {
        self.feat.len()
    }

    /// Class probabilities for one row: the mean over trees of the class distribution
    /// of the leaf the row falls into. Writes `n_classes` values into `out`.
    ///
    /// Panics when `row.len() != n_features()` or `out.len() != n_classes()`.
    pub fn predict_proba_row(&self, row: &[f32], out: &mut [f32]) {
        assert_eq!(row.len(), self.n_features, "row length does not match the forest's features");
        assert_eq!(out.len(), self.n_classes, "output length does not match the forest's classes");
        out.fill(0.0);
        let k = self.n_classes;
        for &root in &self.roots {
            let mut n = root as usize;
            let mut f = self.feat[n];
            while f != LEAF {
                n = if row[f as usize] <= self.thr[n] { self.left[n] } else { self.right[n] } as usize;
                f = self.feat[n];
            }
            let l = self.left[n] as usize * k;
            for (o, p) in out.iter_mut().zip(&self.leaf_proba[l..l + k]) {
                *o += p;
            }
        }
        let inv = 1.0 / self.roots.len() as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }

    /// P(class != 0) for every row of `x`.
    pub fn attack_scores(&self, x: &Matrix) -> Vec<f32> {
        let mut out = vec![0f32; self.n_classes];
        (0..x.rows)
            .map(|i| {
                self.predict_proba_row(x.row(i), &mut out);
                (1.0 - out[0]).clamp(0.0, 1.0)
            })
            .collect()
    }

    /// Per-feature importance (mean over trees of the normalised, sample-weighted
    /// Gini impurity decrease), len = number of features, sums to 1 (or all 0 when no
    /// tree split).
    pub fn feature_importance(&self) -> Vec<f32> {
        self.importance.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// Three classes: class 1 when f0 > 1, class 2 when f1 > 1 (f0 ≤ 1), else 0; the
    /// other columns are noise.
    fn synthetic(rows: usize, cols: usize, seed: u64) -> (Matrix, Vec<usize>) {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut x = Matrix::zeros(rows, cols);
        let mut y = Vec::with_capacity(rows);
        for i in 0..rows {
            let r = x.row_mut(i);
            for v in r.iter_mut() {
                *v = rng.random_range(-2.0f32..2.0);
            }
            y.push(if r[0] > 1.0 { 1 } else if r[1] > 1.0 { 2 } else { 0 });
        }
        (x, y)
    }

    fn params(trees: usize) -> ForestParams {
        ForestParams { trees, feature_fraction: 0.6, ..ForestParams::default() }
    }

    #[test]
    fn learns_and_generalises() {
        let (x, y) = synthetic(1500, 6, 1);
        let mut calls = 0;
        let f = Forest::fit(&x, &y, 3, &params(20), &mut |done, total| {
            calls += 1;
            assert_eq!(total, 20);
            assert_eq!(done, calls);
        })
        .unwrap();
        assert_eq!(calls, 20);
        let (xt, yt) = synthetic(1000, 6, 2);
        let mut p = [0f32; 3];
        let mut correct = 0;
        for i in 0..xt.rows {
            f.predict_proba_row(xt.row(i), &mut p);
            assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-4);
            let best = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap();
            correct += usize::from(best == yt[i]);
        }
        let acc = correct as f64 / xt.rows as f64;
        assert!(acc > 0.93, "accuracy {acc}");
        let s = f.attack_scores(&xt);
        let auc_ok = (0..xt.rows).filter(|&i| (s[i] > 0.5) == (yt[i] != 0)).count() as f64 / xt.rows as f64;
        assert!(auc_ok > 0.93, "attack accuracy {auc_ok}");
        let imp = f.feature_importance();
        assert_eq!(imp.len(), 6);
        assert!((imp.iter().sum::<f32>() - 1.0).abs() < 1e-4);
        assert!(imp[0] > 0.25 && imp[1] > 0.25, "{imp:?}");
        assert!(imp[2..].iter().all(|&v| v < 0.1), "{imp:?}");
    }

    #[test]
    fn deterministic_and_serde_roundtrip() {
        let (x, y) = synthetic(400, 5, 3);
        let a = Forest::fit(&x, &y, 3, &params(5), &mut |_, _| {}).unwrap();
        let b = Forest::fit(&x, &y, 3, &params(5), &mut |_, _| {}).unwrap();
        // Same seed, same samples and feature subsets; linfa-trees sums its Gini
        // impurity over a HashMap (per-process random order), so near-equal splits
        // can flip in f32 rounding: scores agree on almost every row, not bit for bit.
        let (sa, sb) = (a.attack_scores(&x), b.attack_scores(&x));
        let differ = sa.iter().zip(&sb).filter(|(p, q)| (*p - *q).abs() > 1e-6).count();
        assert!(differ * 10 <= sa.len(), "{differ} of {} rows scored differently", sa.len());
        let json = serde_json::to_string(&a).unwrap();
        let c: Forest = serde_json::from_str(&json).unwrap();
        assert_eq!(a.attack_scores(&x), c.attack_scores(&x));
        let other = Forest::fit(&x, &y, 3, &ForestParams { seed: 7, ..params(5) }, &mut |_, _| {}).unwrap();
        assert_ne!(a.attack_scores(&x), other.attack_scores(&x));
    }

    #[test]
    fn single_tree_matches_linfa_prediction() {
        // A full-feature, full-sample tree must reproduce linfa's own predictions.
        let (x, y) = synthetic(300, 4, 4);
        let p = ForestParams { trees: 1, feature_fraction: 1.0, max_depth: 6, ..ForestParams::default() };
        let f = Forest::fit(&x, &y, 3, &p, &mut |_, _| {}).unwrap();
        let mut rng = StdRng::seed_from_u64(tree_seed(p.seed, 0));
        let rows: Vec<usize> = (0..x.rows).map(|_| rng.random_range(0..x.rows)).collect();
        let sub = x.select(&rows);
        let ds = DatasetBase::new(sub.to_ndarray_f64(), ndarray::Array1::from_iter(rows.iter().map(|&r| y[r])));
        let tree = DecisionTree::<f64, usize>::params().max_depth(Some(6)).fit(&ds).unwrap();
        let (xt, _) = synthetic(500, 4, 5);
        let lin = linfa::prelude::Predict::predict(&tree, &xt.to_ndarray_f64());
        let mut pr = [0f32; 3];
        for i in 0..xt.rows {
            f.predict_proba_row(xt.row(i), &mut pr);
            // our leaf distribution's majority is linfa's leaf label (ties aside)
            assert!(pr[lin[i]] >= pr.iter().cloned().fold(0.0, f32::max) - 1e-6, "row {i}: {pr:?} vs {}", lin[i]);
        }
    }

    #[test]
    fn balanced_weights_raise_minority_scores() {
        let (x, mut y) = synthetic(1000, 4, 6);
        // make class 2 rare: keep only 5% of them
        for (i, c) in y.iter_mut().enumerate() {
            if *c == 2 && i % 20 != 0 {
                *c = 0;
            }
        }
        let plain = Forest::fit(&x, &y, 3, &params(10), &mut |_, _| {}).unwrap();
        let bal = Forest::fit(&x, &y, 3, &ForestParams { balanced: true, ..params(10) }, &mut |_, _| {}).unwrap();
        let sum = |f: &Forest| -> f32 {
            let mut p = [0f32; 3];
            (0..x.rows).filter(|&i| y[i] == 2).map(|i| { f.predict_proba_row(x.row(i), &mut p); p[2] }).sum()
        };
        assert!(sum(&bal) >= sum(&plain) * 0.99);
    }

    #[test]
    fn rejects_bad_input() {
        let (x, y) = synthetic(50, 3, 7);
        let e = |r: Result<Forest, ModelError>| r.unwrap_err().to_string();
        assert!(e(Forest::fit(&Matrix::zeros(0, 3), &[], 3, &params(1), &mut |_, _| {})).contains("empty"));
        assert!(e(Forest::fit(&x, &y[1..], 3, &params(1), &mut |_, _| {})).contains("labels"));
        assert!(e(Forest::fit(&x, &vec![0; 50], 3, &params(1), &mut |_, _| {})).contains("one class"));
        assert!(e(Forest::fit(&x, &vec![5; 50], 3, &params(1), &mut |_, _| {})).contains("n_classes"));
        assert!(e(Forest::fit(&x, &y, 3, &ForestParams { feature_fraction: 0.0, ..params(1) }, &mut |_, _| {}))
            .contains("feature_fraction"));
    }

}
