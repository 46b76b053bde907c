//! Random forest (multi-class, class 0 = normal): trained here on binned features,
//! scored from flat arrays.
//!
//! A true random forest in Breiman's and scikit-learn's sense: per tree a seeded
//! bootstrap sample, and at **every split** a fresh random subset of the columns
//! (`max_features`, √columns by default, as scikit-learn's `max_features="sqrt"`);
//! optional balanced class weights; Gini impurity. The split search runs on
//! per-column histograms over at most 256 bins ([`crate::hist`]), as LightGBM and
//! scikit-learn's HistGradientBoosting do, and each tree's leaves keep the (weighted)
//! class distribution of its bootstrap rows.
//!
//! Why written here: linfa-trees (used before) scans every column at every split, so
//! per-split sampling was impossible with it (the forest was a random-subspace
//! forest), and it sums its impurity over a `HashMap`, so a seed did not fix the
//! model. linfa-ensemble's `RandomForest` inherits both. smartcore 0.4's forest
//! samples per split but sorts raw values at every node (no binning), stores its
//! trees in its own types (scoring would go through them per event), and would add
//! a second tensor/linear-algebra stack next to ndarray; the binned learner below
//! is ~300 lines, deterministic for a seed whatever the thread count (trees are
//! seeded by index and assembled in order), and shares its binning with the
//! gradient-boosted member.
use std::sync::{mpsc, OnceLock};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::hist::Bins;
use crate::walk::{Flat, Walk};
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
    /// Columns considered at each split, drawn afresh at every split.
    pub max_features: MaxFeatures,
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
            max_features: MaxFeatures::Sqrt,
            sample_fraction: 1.0,
            balanced: false,
            seed: 42,
        }
    }
}

/// How many columns a split considers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MaxFeatures {
    /// √columns, rounded, at least 1 (scikit-learn's classifier default).
    Sqrt,
    /// A fraction of the columns in (0, 1], at least 1.
    Fraction(f32),
}

impl MaxFeatures {
    fn of(self, cols: usize) -> usize {
        let n = match self {
            MaxFeatures::Sqrt => (cols as f64).sqrt().round() as usize,
            MaxFeatures::Fraction(f) => (cols as f64 * f64::from(f)).round() as usize,
        };
        n.clamp(1, cols.max(1))
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
    /// The scoring layout, built on first use (never stored).
    #[serde(skip)]
    walk: OnceLock<Walk>,
}

fn param_err(name: &'static str, why: impl Into<String>) -> ModelError {
    ModelError::Param { name, why: why.into() }
}

/// Validate a fit's inputs; returns the row count of each class.
fn check_fit(x: &Matrix, y: &[usize], n_classes: usize, params: &ForestParams) -> Result<Vec<usize>, ModelError> {
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
    if counts.iter().filter(|&&n| n > 0).count() < 2 {
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
    if let MaxFeatures::Fraction(f) = params.max_features {
        if !(f > 0.0 && f <= 1.0) {
            return Err(param_err("max_features", format!("fraction {f} is not in (0, 1]")));
        }
    }
    if !(params.sample_fraction > 0.0 && params.sample_fraction <= 1.0) {
        return Err(param_err("sample_fraction", format!("{} is not in (0, 1]", params.sample_fraction)));
    }
    Ok(counts)
}

/// A per-tree seed, decorrelated from the forest seed (SplitMix64 step).
fn tree_seed(seed: u64, tree: usize) -> u64 {
    let mut z = seed ^ (tree as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One grown tree, nodes in pre-order with indices relative to the tree.
struct Grown {
    feat: Vec<u32>,
    thr: Vec<f32>,
    left: Vec<u32>,
    right: Vec<u32>,
    /// Leaf class distributions, `n_classes` per leaf, in leaf order.
    leaves: Vec<f32>,
    /// Impurity decrease per column, normalised to sum 1 (or all 0).
    importance: Vec<f64>,
}

/// What every tree of one fit shares.
struct Grower<'a> {
    codes: &'a [u8],
    rows: usize,
    bins: &'a Bins,
    y: &'a [usize],
    k: usize,
    class_w: &'a [f64],
    max_depth: usize,
    min_leaf: u32,
    mtry: usize,
}

impl Grower<'_> {
    /// Grow tree `t`: bootstrap `n_sample` rows, then split depth-first.
    fn tree(&self, seed: u64, n_sample: usize) -> Grown {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut count = vec![0u32; self.rows];
        for _ in 0..n_sample {
            count[rng.random_range(0..self.rows)] += 1;
        }
        let mut idx: Vec<u32> = (0..self.rows as u32).filter(|&r| count[r as usize] > 0).collect();
        let cols = self.bins.edges.len();
        let mut g = Grown { feat: Vec::new(), thr: Vec::new(), left: Vec::new(), right: Vec::new(), leaves: Vec::new(), importance: vec![0.0; cols] };
        let n = idx.len();
        self.node(&mut g, &mut rng, &count, &mut idx[..n], 0);
        let s: f64 = g.importance.iter().sum();
        if s > 0.0 {
            g.importance.iter_mut().for_each(|v| *v /= s);
        }
        g
    }

    /// Weighted class totals and row count (with bootstrap multiplicity) of `idx`.
    fn totals(&self, count: &[u32], idx: &[u32]) -> (Vec<f64>, u32) {
        let mut w = vec![0f64; self.k];
        let mut n = 0u32;
        for &r in idx {
            let c = count[r as usize];
            w[self.y[r as usize]] += f64::from(c) * self.class_w[self.y[r as usize]];
            n += c;
        }
        (w, n)
    }

    /// The best split of `idx` on column `f`: (score, bin), where score is
    /// Σ_side Σ_class w² / W_side (larger = purer), or None when no bin leaves
    /// `min_leaf` rows on both sides.
    fn best_on(&self, f: usize, count: &[u32], idx: &[u32], hist: &mut Vec<f64>, cnt: &mut Vec<u32>) -> Option<(f64, usize)> {
        let nb = self.bins.n_bins(f);
        let k = self.k;
        hist.clear();
        hist.resize(nb * k, 0.0);
        cnt.clear();
        cnt.resize(nb, 0);
        let codes = &self.codes[f * self.rows..(f + 1) * self.rows];
        for &r in idx {
            let r = r as usize;
            let b = usize::from(codes[r]);
            let c = count[r];
            hist[b * k + self.y[r]] += f64::from(c) * self.class_w[self.y[r]];
            cnt[b] += c;
        }
        let total: Vec<f64> = (0..k).map(|c| (0..nb).map(|b| hist[b * k + c]).sum()).collect();
        let n_total: u32 = cnt.iter().sum();
        let mut left = vec![0f64; k];
        let mut n_left = 0u32;
        let mut best: Option<(f64, usize)> = None;
        for b in 0..nb - 1 {
            for c in 0..k {
                left[c] += hist[b * k + c];
            }
            n_left += cnt[b];
            if cnt[b] == 0 && b > 0 {
                // Same partition as the bin before.
                continue;
            }
            if n_left < self.min_leaf || n_total - n_left < self.min_leaf {
                continue;
            }
            let (wl, wr): (f64, f64) = (left.iter().sum(), total.iter().zip(&left).map(|(t, l)| t - l).sum());
            if wl <= 0.0 || wr <= 0.0 {
                continue;
            }
            let sl: f64 = left.iter().map(|v| v * v).sum::<f64>() / wl;
            let sr: f64 = total.iter().zip(&left).map(|(t, l)| (t - l) * (t - l)).sum::<f64>() / wr;
            let score = sl + sr;
            if best.is_none_or(|(s, _)| score > s + 1e-12) {
                best = Some((score, b));
            }
        }
        best
    }

    /// Grow the subtree of `idx` (reordered in place); returns its node index.
    fn node(&self, g: &mut Grown, rng: &mut StdRng, count: &[u32], idx: &mut [u32], depth: usize) -> usize {
        let me = g.feat.len();
        let (w, n) = self.totals(count, idx);
        let wsum: f64 = w.iter().sum();
        let pure = w.iter().filter(|&&v| v > 0.0).count() <= 1;
        let mut split = None;
        if depth < self.max_depth && n >= 2 * self.min_leaf && !pure {
            let cols = self.bins.edges.len();
            // A fresh column subset at every split; when none of it can split
            // (constant here), the other columns are tried in random order, as
            // scikit-learn does, before the node becomes a leaf.
            let order = rand::seq::index::sample(rng, cols, cols).into_vec();
            let (mut hist, mut cnt) = (Vec::new(), Vec::new());
            let mut best: Option<(f64, usize, usize)> = None;
            let mut tried = 0;
            for &f in &order {
                if tried >= self.mtry {
                    break;
                }
                if let Some((score, b)) = self.best_on(f, count, idx, &mut hist, &mut cnt) {
                    tried += 1;
                    if best.is_none_or(|(s, _, _)| score > s + 1e-12) {
                        best = Some((score, f, b));
                    }
                }
            }
            let parent: f64 = w.iter().map(|v| v * v).sum::<f64>() / wsum;
            split = best.filter(|(s, _, _)| *s > parent + 1e-12).map(|(s, f, b)| (s - parent, f, b));
        }
        g.feat.push(LEAF);
        g.thr.push(0.0);
        g.left.push(0);
        g.right.push(0);
        let Some((gain, f, b)) = split else {
            g.left[me] = (g.leaves.len() / self.k) as u32;
            g.leaves.extend(w.iter().map(|&v| (v / wsum.max(f64::MIN_POSITIVE)) as f32));
            return me;
        };
        g.importance[f] += gain;
        // Partition in place: rows going left first.
        let i = crate::hist::partition(idx, &self.codes[f * self.rows..(f + 1) * self.rows], b);
        let (l_idx, r_idx) = idx.split_at_mut(i);
        g.feat[me] = f as u32;
        g.thr[me] = self.bins.edges[f][b];
        let l = self.node(g, rng, count, l_idx, depth + 1);
        let r = self.node(g, rng, count, r_idx, depth + 1);
        g.left[me] = l as u32;
        g.right[me] = r as u32;
        me
    }
}

impl Forest {
    /// Trains `params.trees` trees on `x` (rows × features) with labels `y`
    /// (`y[i] < n_classes`, class 0 = normal). Deterministic for a given seed,
    /// whatever the number of threads (trees are grown in parallel on the available
    /// cores, each from a seed of its own index). `progress(done, total)` is called
    /// as trees finish.
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
        let counts = check_fit(x, y, n_classes, params)?;
        let present = counts.iter().filter(|&&n| n > 0).count();
        let class_w: Vec<f64> = if params.balanced {
            counts.iter().map(|&n| if n == 0 { 0.0 } else { x.rows as f64 / (present as f64 * n as f64) }).collect()
        } else {
            vec![1.0; n_classes]
        };
        let bins = Bins::fit(&x.data, x.rows, x.cols, 256);
        let codes = bins.codes(&x.data, x.rows);
        let grower = Grower {
            codes: &codes,
            rows: x.rows,
            bins: &bins,
            y,
            k: n_classes,
            class_w: &class_w,
            max_depth: params.max_depth,
            min_leaf: params.min_samples_leaf as u32,
            mtry: params.max_features.of(x.cols),
        };
        let n_sample = ((x.rows as f64 * f64::from(params.sample_fraction)).ceil() as usize).max(1);
        let workers = std::thread::available_parallelism().map_or(1, |n| n.get()).min(params.trees);
        let mut grown: Vec<Option<Grown>> = (0..params.trees).map(|_| None).collect();
        std::thread::scope(|scope| {
            let (tx, rx) = mpsc::channel::<(usize, Grown)>();
            for w in 0..workers {
                let (tx, grower) = (tx.clone(), &grower);
                scope.spawn(move || {
                    for t in (w..params.trees).step_by(workers) {
                        if tx.send((t, grower.tree(tree_seed(params.seed, t), n_sample))).is_err() {
                            return;
                        }
                    }
                });
            }
            drop(tx);
            for (done, (t, g)) in rx.into_iter().enumerate() {
                grown[t] = Some(g);
                progress(done + 1, params.trees);
            }
        });
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
            walk: OnceLock::new(),
        };
        let mut importance = vec![0f64; x.cols];
        for (t, g) in grown.into_iter().enumerate() {
            let g = g.ok_or_else(|| ModelError::Train(format!("tree {t} was not grown (a training thread panicked)")))?;
            let (base, leaf_base) = (forest.feat.len() as u32, (forest.leaf_proba.len() / n_classes) as u32);
            forest.roots.push(base);
            for i in 0..g.feat.len() {
                forest.feat.push(g.feat[i]);
                forest.thr.push(g.thr[i]);
                if g.feat[i] == LEAF {
                    forest.left.push(leaf_base + g.left[i]);
                    forest.right.push(0);
                } else {
                    forest.left.push(base + g.left[i]);
                    forest.right.push(base + g.right[i]);
                }
            }
            forest.leaf_proba.extend_from_slice(&g.leaves);
            for (acc, v) in importance.iter_mut().zip(&g.importance) {
                *acc += v;
            }
        }
        let s: f64 = importance.iter().sum();
        forest.importance = importance.iter().map(|&v| if s > 0.0 { (v / s) as f32 } else { 0.0 }).collect();
        Ok(forest)
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

    /// The trees in their scoring layout; a leaf's payload is its leaf number.
    fn walk(&self) -> &Walk {
        self.walk.get_or_init(|| {
            let flat = Flat { roots: &self.roots, feat: &self.feat, thr: &self.thr, left: &self.left, right: &self.right };
            Walk::build(&flat, |n| self.left[n])
        })
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
        let walk = self.walk();
        for tree in 0..walk.trees() {
            let l = walk.leaf(tree, row) as usize * k;
            for (o, p) in out.iter_mut().zip(&self.leaf_proba[l..l + k]) {
                *o += p;
            }
        }
        let inv = 1.0 / self.roots.len() as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }

    /// [`predict_proba_row`](Self::predict_proba_row) for `n` rows at once (`rows`
    /// row-major, `out` n × classes), tree by tree: one tree's nodes stay in cache
    /// while every row walks it, several rows side by side. Same sums in the same
    /// order as row by row, so the same bits.
    pub fn predict_proba_rows(&self, rows: &[f32], out: &mut [f32]) {
        let (f, k) = (self.n_features, self.n_classes);
        assert_eq!(rows.len() % f.max(1), 0, "rows do not match the forest's features");
        let n = rows.len() / f.max(1);
        assert_eq!(out.len(), n * k, "output length does not match rows × classes");
        out.fill(0.0);
        let walk = self.walk();
        walk.every_leaf(rows, f, |i, leaf| {
            let l = leaf as usize * k;
            for (o, p) in out[i * k..(i + 1) * k].iter_mut().zip(&self.leaf_proba[l..l + k]) {
                *o += p;
            }
        });
        let inv = 1.0 / self.roots.len() as f32;
        for o in out.iter_mut() {
            *o *= inv;
        }
    }

    /// One forest of all the trees of `parts` (federated pooling): a tree keeps
    /// its votes, so the pooled forest averages over every tree of every part.
    /// The parts must agree on classes and features.
    pub fn merge(parts: &[&Forest]) -> Result<Forest, ModelError> {
        let first = parts.first().ok_or_else(|| ModelError::Data("no forests to merge".into()))?;
        let (k, d) = (first.n_classes, first.n_features);
        if let Some(p) = parts.iter().find(|p| p.n_classes != k || p.n_features != d) {
            return Err(ModelError::Data(format!(
                "cannot merge a forest of {} classes × {} features into one of {k} × {d}",
                p.n_classes, p.n_features
            )));
        }
        let mut m = Forest { n_classes: k, n_features: d, roots: vec![], feat: vec![], thr: vec![], left: vec![], right: vec![], leaf_proba: vec![], importance: vec![0.0; d], walk: OnceLock::new() };
        let trees: usize = parts.iter().map(|p| p.roots.len()).sum();
        for p in parts {
            let (node0, leaf0) = (m.feat.len() as u32, (m.leaf_proba.len() / k) as u32);
            m.roots.extend(p.roots.iter().map(|r| r + node0));
            for i in 0..p.feat.len() {
                let leaf = p.feat[i] == LEAF;
                m.feat.push(p.feat[i]);
                m.thr.push(p.thr[i]);
                m.left.push(p.left[i] + if leaf { leaf0 } else { node0 });
                m.right.push(if leaf { p.right[i] } else { p.right[i] + node0 });
            }
            m.leaf_proba.extend_from_slice(&p.leaf_proba);
            let share = p.roots.len() as f32 / trees.max(1) as f32;
            for (a, b) in m.importance.iter_mut().zip(&p.importance) {
                *a += share * b;
            }
        }
        Ok(m)
    }

    /// A forest of trees given in flat form (see [`Forest`]; a leaf's `left` is
    /// its leaf number into `leaf_proba`), e.g. trees whose shape was drawn
    /// without rows and whose leaves come from the federation's noisy counts.
    pub(crate) fn from_flat(n_classes: usize, n_features: usize, trees: crate::walk::Flat<'_>, leaf_proba: Vec<f32>) -> Forest {
        Forest {
            n_classes,
            n_features,
            roots: trees.roots.to_vec(),
            feat: trees.feat.to_vec(),
            thr: trees.thr.to_vec(),
            left: trees.left.to_vec(),
            right: trees.right.to_vec(),
            leaf_proba,
            importance: vec![0.0; n_features],
            walk: OnceLock::new(),
        }
    }

    /// Number of trees.
    pub fn trees(&self) -> usize {
        self.roots.len()
    }

    /// P(class != 0) for every row of `x`.
    pub fn attack_scores(&self, x: &Matrix) -> Vec<f32> {
        let mut out = vec![0f32; x.rows * self.n_classes];
        self.predict_proba_rows(&x.data, &mut out);
        out.chunks_exact(self.n_classes.max(1)).map(|p| (1.0 - p[0]).clamp(0.0, 1.0)).collect()
    }

    /// Per-feature importance (mean over trees of the normalised, sample-weighted
    /// Gini impurity decrease), len = number of features, sums to 1 (or all 0 when no
    /// tree split).
    pub fn feature_importance(&self) -> Vec<f32> {
        self.importance.clone()
    }
}

#[cfg(test)]
#[path = "forest_tests.rs"]
mod tests;
