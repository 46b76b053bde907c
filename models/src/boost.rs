//! Gradient-boosted trees (binary log-loss): the ensemble's boosted member.
//!
//! The algorithm of LightGBM and scikit-learn's HistGradientBoosting, written here
//! over the forest's binning ([`crate::hist`]): each round fits one regression tree
//! to the gradients and Hessians of the log-loss, grown depth-first on per-column
//! histograms of (Σg, Σh, rows), split gain ½(G_L²/(H_L+λ) + G_R²/(H_R+λ) − G²/(H+λ)),
//! leaf value −G/(H+λ) × learning rate. Early stopping on a seeded, stratified
//! slice of the training rows (10 %, as scikit-learn does above 10,000 rows): the
//! model keeps the rounds up to its best held-out log-loss. Deterministic for a
//! seed. Stored as flat arrays (`x <= thr` goes left, NaN goes right), scored
//! through their scoring layout (`walk.rs`).
//!
//! Why written here rather than taken from a crate: see ARCHITECTURE.md
//! ("Models"): the candidates were compared there.

use std::sync::OnceLock;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::hist::Bins;
use crate::walk::{Flat, Walk};
use crate::{Matrix, ModelError};

const LEAF: u32 = u32::MAX;

/// Hyper-parameters of [`Booster::fit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BoostParams {
    /// Most boosting rounds (trees); early stopping usually ends sooner.
    pub rounds: usize,
    pub learning_rate: f64,
    pub max_depth: usize,
    /// Fewest training rows in a leaf.
    pub min_samples_leaf: usize,
    /// L2 penalty on leaf values (λ).
    pub l2: f64,
    /// Rounds without a better held-out log-loss before stopping (0: never stop early).
    pub early_stopping: usize,
    /// Share of the training rows held out for early stopping.
    pub validation_fraction: f64,
    pub seed: u64,
}

impl Default for BoostParams {
    fn default() -> Self {
        BoostParams { rounds: 300, learning_rate: 0.1, max_depth: 6, min_samples_leaf: 20, l2: 1.0, early_stopping: 20, validation_fraction: 0.1, seed: 42 }
    }
}

/// A trained booster in flat form (node layout as the forest's; a leaf's value is
/// `value[i]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Booster {
    n_features: usize,
    base: f32,
    roots: Vec<u32>,
    feat: Vec<u32>,
    thr: Vec<f32>,
    left: Vec<u32>,
    right: Vec<u32>,
    value: Vec<f32>,
    /// The scoring layout, built on first use (never stored); a leaf's payload
    /// is the bits of its value.
    #[serde(skip)]
    walk: OnceLock<Walk>,
}

struct Grow<'a> {
    codes: &'a [u8],
    rows: usize,
    bins: &'a Bins,
    g: &'a [f64],
    h: &'a [f64],
    p: &'a BoostParams,
}

impl Grow<'_> {
    /// Grow the subtree of `idx` into `b`; adds each leaf's value to `raw` of its rows.
    fn node(&self, b: &mut Booster, idx: &mut [u32], depth: usize, raw: &mut [f64]) -> u32 {
        let me = b.feat.len() as u32;
        let (gs, hs): (f64, f64) = idx.iter().fold((0.0, 0.0), |(g, h), &r| (g + self.g[r as usize], h + self.h[r as usize]));
        b.feat.push(LEAF);
        b.thr.push(0.0);
        b.left.push(0);
        b.right.push(0);
        b.value.push(0.0);
        let min = self.p.min_samples_leaf.max(1);
        let mut best: Option<(f64, usize, usize)> = None;
        if depth < self.p.max_depth && idx.len() >= 2 * min {
            let parent = gs * gs / (hs + self.p.l2);
            let mut hist: Vec<(f64, f64, u32)> = Vec::new();
            for f in 0..self.bins.edges.len() {
                let nb = self.bins.n_bins(f);
                hist.clear();
                hist.resize(nb, (0.0, 0.0, 0));
                let codes = &self.codes[f * self.rows..(f + 1) * self.rows];
                for &r in idx.iter() {
                    let e = &mut hist[usize::from(codes[r as usize])];
                    e.0 += self.g[r as usize];
                    e.1 += self.h[r as usize];
                    e.2 += 1;
                }
                let (mut gl, mut hl, mut nl) = (0.0, 0.0, 0usize);
                for (bin, &(g, h, n)) in hist.iter().enumerate().take(nb - 1) {
                    gl += g;
                    hl += h;
                    nl += n as usize;
                    if n == 0 || nl < min || idx.len() - nl < min {
                        continue;
                    }
                    let (gr, hr) = (gs - gl, hs - hl);
                    let gain = 0.5 * (gl * gl / (hl + self.p.l2) + gr * gr / (hr + self.p.l2) - parent);
                    if gain > 1e-9 && best.is_none_or(|(bg, _, _)| gain > bg) {
                        best = Some((gain, f, bin));
                    }
                }
            }
        }
        let Some((_, f, bin)) = best else {
            let v = (-gs / (hs + self.p.l2) * self.p.learning_rate) as f32;
            b.value[me as usize] = v;
            for &r in idx.iter() {
                raw[r as usize] += f64::from(v);
            }
            return me;
        };
        let i = crate::hist::partition(idx, &self.codes[f * self.rows..(f + 1) * self.rows], bin);
        let (l_idx, r_idx) = idx.split_at_mut(i);
        b.feat[me as usize] = f as u32;
        b.thr[me as usize] = self.bins.edges[f][bin];
        let l = self.node(b, l_idx, depth + 1, raw);
        let r = self.node(b, r_idx, depth + 1, raw);
        b.left[me as usize] = l;
        b.right[me as usize] = r;
        me
    }
}

fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

impl Booster {
    /// Fit on `x` (rows × features) with binary labels `y` (true = attack).
    /// `progress(round, rounds)` after each round.
    pub fn fit(x: &Matrix, y: &[bool], p: &BoostParams, progress: &mut dyn FnMut(usize, usize)) -> Result<Booster, ModelError> {
        Self::fit_from(None, x, y, p, progress)
    }

    /// [`Booster::fit`] continuing from `init`'s trees (its scores are where the
    /// new rounds start; at most `p.rounds` trees are added, early-stopped on this
    /// data's hold-out): a site's turn in cyclic federated boosting.
    pub fn fit_from(init: Option<&Booster>, x: &Matrix, y: &[bool], p: &BoostParams, progress: &mut dyn FnMut(usize, usize)) -> Result<Booster, ModelError> {
        if let Some(b) = init.filter(|b| b.n_features != x.cols) {
            return Err(ModelError::Data(format!("the starting booster has {} features, the rows {}", b.n_features, x.cols)));
        }
        if x.rows == 0 || x.cols == 0 || y.len() != x.rows {
            return Err(ModelError::Data(format!("boosting needs rows with one label each: {} rows × {} columns, {} labels", x.rows, x.cols, y.len())));
        }
        let pos = y.iter().filter(|&&v| v).count();
        if pos == 0 || pos == y.len() {
            return Err(ModelError::Data("boosting needs both normal and attack rows".into()));
        }
        if p.rounds == 0 || p.max_depth == 0 || !(p.learning_rate > 0.0 && p.learning_rate <= 1.0) || p.l2 < 0.0 {
            return Err(ModelError::Param { name: "boost", why: format!("rounds and max_depth ≥ 1, learning_rate in (0, 1], l2 ≥ 0: got {p:?}") });
        }
        if !(0.0..0.5).contains(&p.validation_fraction) {
            return Err(ModelError::Param { name: "boost.validation_fraction", why: format!("{} is not in [0, 0.5)", p.validation_fraction) });
        }
        // Stratified hold-out for early stopping.
        let mut rng = rand::rngs::StdRng::seed_from_u64(p.seed ^ 0xB005_7ED);
        let mut held = vec![false; x.rows];
        if p.early_stopping > 0 && p.validation_fraction > 0.0 {
            for class in [false, true] {
                let mut rows: Vec<usize> = (0..x.rows).filter(|&i| y[i] == class).collect();
                rows.shuffle(&mut rng);
                let k = (rows.len() as f64 * p.validation_fraction).round() as usize;
                rows.iter().take(k).for_each(|&i| held[i] = true);
            }
        }
        let fit_rows: Vec<usize> = (0..x.rows).filter(|&i| !held[i]).collect();
        let held_rows: Vec<usize> = (0..x.rows).filter(|&i| held[i]).collect();
        let xf = x.select(&fit_rows);
        let yf: Vec<bool> = fit_rows.iter().map(|&i| y[i]).collect();
        let bins = Bins::fit(&xf.data, xf.rows, xf.cols, 256);
        let codes = bins.codes(&xf.data, xf.rows);
        let prior = yf.iter().filter(|&&v| v).count() as f64 / yf.len() as f64;
        let base = (prior / (1.0 - prior)).ln();
        let mut b = match init {
            // Trees are appended below: the clone must not keep `init`'s layout.
            Some(b) => Booster { walk: OnceLock::new(), ..b.clone() },
            None => Booster { n_features: x.cols, base: base as f32, roots: Vec::new(), feat: Vec::new(), thr: Vec::new(), left: Vec::new(), right: Vec::new(), value: Vec::new(), walk: OnceLock::new() },
        };
        let start = |row: &[f32]| f64::from(b.base) + b.roots.iter().map(|&r| f64::from(b.tree_value(r as usize, row))).sum::<f64>();
        let mut raw: Vec<f64> = (0..xf.rows).map(|i| start(xf.row(i))).collect();
        let mut raw_held: Vec<f64> = held_rows.iter().map(|&i| start(x.row(i))).collect();
        let first = b.roots.len();
        let (mut g, mut h) = (vec![0.0; xf.rows], vec![0.0; xf.rows]);
        let (mut best_loss, mut best_round, mut best_nodes) = (f64::INFINITY, 0usize, 0usize);
        for round in 0..p.rounds {
            for i in 0..xf.rows {
                let q = sigmoid(raw[i]);
                g[i] = q - f64::from(u8::from(yf[i]));
                h[i] = (q * (1.0 - q)).max(1e-12);
            }
            let grow = Grow { codes: &codes, rows: xf.rows, bins: &bins, g: &g, h: &h, p };
            let mut idx: Vec<u32> = (0..xf.rows as u32).collect();
            let root = grow.node(&mut b, &mut idx, 0, &mut raw);
            b.roots.push(root);
            progress(round + 1, p.rounds);
            if held_rows.is_empty() {
                continue;
            }
            let mut loss = 0.0;
            for (k, &i) in held_rows.iter().enumerate() {
                raw_held[k] += f64::from(b.tree_value(root as usize, x.row(i)));
                let q = sigmoid(raw_held[k]).clamp(1e-15, 1.0 - 1e-15);
                loss -= if y[i] { q.ln() } else { (1.0 - q).ln() };
            }
            if loss < best_loss - 1e-9 {
                (best_loss, best_round, best_nodes) = (loss, round + 1, b.feat.len());
            } else if round + 1 - best_round >= p.early_stopping {
                break;
            }
        }
        if !held_rows.is_empty() && best_round > 0 {
            b.roots.truncate(first + best_round);
            for v in [&mut b.left, &mut b.right] {
                v.truncate(best_nodes);
            }
            b.feat.truncate(best_nodes);
            b.thr.truncate(best_nodes);
            b.value.truncate(best_nodes);
        }
        Ok(b)
    }

    /// The value of the leaf `row` reaches in the tree at `root`, over the stored
    /// arrays: for training, while trees are still being added (scoring uses
    /// [`walk`](Self::walk)).
    fn tree_value(&self, root: usize, row: &[f32]) -> f32 {
        let mut n = root;
        let mut f = self.feat[n];
        while f != LEAF {
            n = if row[f as usize] <= self.thr[n] { self.left[n] } else { self.right[n] } as usize;
            f = self.feat[n];
        }
        self.value[n]
    }

    /// The trees in their scoring layout (built once the booster is complete).
    fn walk(&self) -> &Walk {
        self.walk.get_or_init(|| {
            let flat = Flat { roots: &self.roots, feat: &self.feat, thr: &self.thr, left: &self.left, right: &self.right };
            Walk::build(&flat, |n| self.value[n].to_bits())
        })
    }

    /// P(attack) of one standardised row. Panics when its length is not the
    /// booster's feature count.
    pub fn predict_row(&self, row: &[f32]) -> f32 {
        assert_eq!(row.len(), self.n_features, "row length does not match the booster's features");
        let walk = self.walk();
        let z: f32 = self.base + (0..walk.trees()).map(|t| f32::from_bits(walk.leaf(t, row))).sum::<f32>();
        1.0 / (1.0 + (-z).exp())
    }

    /// [`predict_row`](Self::predict_row) for `n` rows at once (`rows` row-major,
    /// `out` n long), tree by tree (the tree's nodes stay in cache), several rows
    /// side by side; the same sum in the same order as row by row, so the same
    /// bits.
    pub fn predict_rows(&self, rows: &[f32], out: &mut [f32]) {
        let f = self.n_features;
        assert_eq!(rows.len(), out.len() * f, "rows do not match the booster's features and the output");
        // `Sum` for f32 folds from -0.0: start there so the bits match predict_row.
        out.fill(-0.0);
        let walk = self.walk();
        walk.every_leaf(rows, f, |i, leaf| out[i] += f32::from_bits(leaf));
        for o in out.iter_mut() {
            *o = 1.0 / (1.0 + (-(self.base + *o)).exp());
        }
    }

    /// The booster whose log-odds are the mean of the parts' (federated tree
    /// bagging: each site boosts on its own rows, the global model averages them;
    /// Flower's FedXgbBagging appends the trees the same way).
    pub fn average(parts: &[&Booster]) -> Result<Booster, ModelError> {
        let first = parts.first().ok_or_else(|| ModelError::Data("no boosters to average".into()))?;
        if let Some(p) = parts.iter().find(|p| p.n_features != first.n_features) {
            return Err(ModelError::Data(format!("cannot average a booster of {} features with one of {}", p.n_features, first.n_features)));
        }
        let inv = 1.0 / parts.len() as f32;
        let mut m = Booster { n_features: first.n_features, base: 0.0, roots: vec![], feat: vec![], thr: vec![], left: vec![], right: vec![], value: vec![], walk: OnceLock::new() };
        for p in parts {
            let node0 = m.feat.len() as u32;
            m.base += inv * p.base;
            m.roots.extend(p.roots.iter().map(|r| r + node0));
            for i in 0..p.feat.len() {
                let leaf = p.feat[i] == LEAF;
                m.feat.push(p.feat[i]);
                m.thr.push(p.thr[i]);
                m.left.push(if leaf { p.left[i] } else { p.left[i] + node0 });
                m.right.push(if leaf { p.right[i] } else { p.right[i] + node0 });
                m.value.push(inv * p.value[i]);
            }
        }
        Ok(m)
    }

    /// This booster with the leaf values of the trees it has beyond `old`'s
    /// multiplied by `factor` (the model-replacement attack on cyclic boosting).
    pub fn boost_new_trees(mut self, old: Option<&Booster>, factor: f32) -> Booster {
        let first_node = old.map_or(0, |o| o.feat.len());
        for v in &mut self.value[first_node..] {
            *v *= factor;
        }
        self.walk = OnceLock::new();
        self
    }

    /// A booster of trees given in flat form (a leaf: `feat` `u32::MAX`, its
    /// value in `value`; 0 for internal nodes), with base log-odds `base`.
    pub(crate) fn from_flat(n_features: usize, base: f32, trees: Flat<'_>, value: Vec<f32>) -> Booster {
        Booster {
            n_features,
            base,
            roots: trees.roots.to_vec(),
            feat: trees.feat.to_vec(),
            thr: trees.thr.to_vec(),
            left: trees.left.to_vec(),
            right: trees.right.to_vec(),
            value,
            walk: OnceLock::new(),
        }
    }

    /// Trees kept after early stopping.
    pub fn rounds(&self) -> usize {
        self.roots.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    fn data(rows: usize, seed: u64) -> (Matrix, Vec<bool>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut x = Matrix::zeros(rows, 5);
        let mut y = Vec::new();
        for i in 0..rows {
            let r = x.row_mut(i);
            r.iter_mut().for_each(|v| *v = rng.random_range(-2.0f32..2.0));
            // An interaction no single split captures, plus label noise.
            let t = (r[0] * r[1] > 0.3) ^ (rng.random::<f32>() < 0.03);
            y.push(t);
        }
        (x, y)
    }

    #[test]
    fn learns_an_interaction_and_stops_early() {
        let (x, y) = data(4000, 1);
        let mut rounds = 0;
        let b = Booster::fit(&x, &y, &BoostParams::default(), &mut |r, _| rounds = r).unwrap();
        assert!(b.rounds() < rounds || rounds == 300, "kept {} of {rounds}", b.rounds());
        let (xt, yt) = data(2000, 2);
        let acc = (0..xt.rows).filter(|&i| (b.predict_row(xt.row(i)) > 0.5) == yt[i]).count() as f64 / xt.rows as f64;
        assert!(acc > 0.9, "accuracy {acc}");
        // Tree by tree over a batch: the same bits as row by row.
        let mut batch = vec![0f32; xt.rows];
        b.predict_rows(&xt.data, &mut batch);
        for (i, v) in batch.iter().enumerate() {
            assert_eq!(v.to_bits(), b.predict_row(xt.row(i)).to_bits(), "row {i}");
        }
    }

    #[test]
    fn deterministic_and_serde_roundtrip() {
        let (x, y) = data(800, 3);
        let p = BoostParams { rounds: 30, ..BoostParams::default() };
        let a = Booster::fit(&x, &y, &p, &mut |_, _| {}).unwrap();
        let b = Booster::fit(&x, &y, &p, &mut |_, _| {}).unwrap();
        assert_eq!(serde_json::to_string(&a).unwrap(), serde_json::to_string(&b).unwrap());
        let c: Booster = serde_json::from_str(&serde_json::to_string(&a).unwrap()).unwrap();
        assert_eq!(a.predict_row(x.row(7)), c.predict_row(x.row(7)));
    }

    #[test]
    fn boosting_on_from_a_scored_booster_scores_every_tree() {
        let (x, y) = data(800, 3);
        let a = Booster::fit(&x, &y, &BoostParams { rounds: 10, ..BoostParams::default() }, &mut |_, _| {}).unwrap();
        a.predict_row(x.row(0)); // builds a's scoring layout
        let b = Booster::fit_from(Some(&a), &x, &y, &BoostParams { rounds: 10, ..BoostParams::default() }, &mut |_, _| {}).unwrap();
        assert!(b.rounds() > a.rounds(), "no trees were added");
        for i in 0..50 {
            let z = b.base + b.roots.iter().map(|&r| b.tree_value(r as usize, x.row(i))).sum::<f32>();
            assert_eq!(b.predict_row(x.row(i)).to_bits(), (1.0 / (1.0 + (-z).exp())).to_bits(), "row {i}");
        }
    }

    #[test]
    fn rejects_one_class_and_bad_parameters() {
        let (x, y) = data(100, 4);
        assert!(Booster::fit(&x, &vec![true; 100], &BoostParams::default(), &mut |_, _| {}).unwrap_err().to_string().contains("both"));
        let bad = BoostParams { learning_rate: 0.0, ..BoostParams::default() };
        assert!(Booster::fit(&x, &y, &bad, &mut |_, _| {}).unwrap_err().to_string().contains("learning_rate"));
    }
}
