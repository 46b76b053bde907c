//! Record-level differential privacy of the tree members (the forest and the
//! boosted trees) in a private federation (`--dp-noise`, `[plan.dp]`).
//!
//! A tree fitted on rows gives them away twice: through its leaves (counts of
//! rows) and through its shape (every split is chosen on the rows). Here the
//! shape is drawn before any row is seen, as in random decision trees (Fan et
//! al. 2003; Jagannathan, Pillaipakkamnatt and Wright 2009, a differentially
//! private random decision tree classifier): at every node a random feature and
//! a cut between two cells of the private standardiser's noisy grid, drawn in
//! proportion to the grid's noisy row mass inside the node's range (the grid is
//! a DP release already: drawing from it costs nothing more). The aggregator
//! sends the shapes; each site answers, per leaf, sums over its training rows
//! (class counts for the forest; gradient and Hessian sums of the log-loss for
//! a boosting round); the aggregator adds the accepted sites' sums and Gaussian
//! noise once (central DP, the aggregator trusted as for every other member),
//! then sets the leaves from the noisy sums (the aggregator's side:
//! [`super::private_fit`]). The sums of every site equal the
//! sums one site holding all the rows would send: without noise, the federated
//! tree is the central one.
//!
//! Sensitivity: every training row is in every tree (no bootstrap) and falls in
//! one leaf of each, so adding or removing a row moves one count per tree by
//! one (L2 √T over T trees); in a boosting round of B trees it moves one
//! (g, 4h) pair per tree with |g| ≤ 1 and 0 ≤ 4h ≤ 1 (L2 √(2B)); R rounds
//! compose (zCDP adds up).
//!
//! The screen (the robust rules): before the sums are added, every site's
//! counts are compared with the others' at the aggregator (no site sees
//! another's counts): scored by the other sites' normal share in its leaf, its
//! normal rows should rank above its attack rows (a ROC-AUC per tree, averaged).
//! A site far below the others (under median − max(3 MAD, 0.25)) is expelled,
//! as a site whose trees show its labels inverted is without DP; and so is a
//! site whose normal rows sit among the others' rows of one attack class far
//! more than the median site's (over median × 1.4, median + 0.02 and median +
//! 3 MAD of that class's share): the targeted flip, an attack class labelled normal. The decisions
//! use the exact counts: they are provenance, listed as not private.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::protocol::Answer;
use super::stats::{grid_lower_edge, GRID_BINS};
use crate::boost::Booster;
use crate::{Matrix, Standardizer};

pub(crate) const LEAF: u32 = u32::MAX;
/// Most depth of the private forest's trees (256 leaves at most); less where
/// the rows are few against the noise ([`depth_for`]).
pub const FOREST_DEPTH: usize = 8;
/// Boosting rounds of the private boosted trees, trees drawn per round (their
/// Newton steps averaged), their most depth and the learning rate of a round.
pub const BOOST_ROUNDS: usize = 20;
pub const BOOST_TREES: usize = 5;
pub const BOOST_DEPTH: usize = 6;
pub const BOOST_RATE: f64 = 0.5;
/// The screen rejects a site whose AUC against the others' leaves is this far
/// under the median at least (3 MAD when that is more), or whose normal rows
/// sit among one attack class's rows of the others more than the median
/// site's do by this fraction of it at least ([`CLASS_MARGIN`]), and by
/// [`CLASS_FLOOR`] (3 MAD when more than both).
pub const SCREEN_MARGIN: f64 = 0.25;
pub const CLASS_MARGIN: f64 = 0.4;
pub const CLASS_FLOOR: f64 = 0.02;

/// The depth at which a tree's leaves hold 4σ rows on average (at least 2,
/// at most `max`): deeper, and the noise outweighs the counts of most leaves.
/// `rows` is the noisy grid's (a DP release), never an exact count.
pub fn depth_for(rows: f64, sd: f64, max: usize) -> usize {
    let d = (rows / (4.0 * sd)).max(1.0).log2().floor() as usize;
    d.clamp(2, max.max(2))
}

/// Per feature, where a private tree may cut: standardised thresholds in
/// ascending order, and the noisy row mass of each segment between them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Cuts {
    /// Training rows by the noisy grid (the median over features of its mass).
    pub rows: f64,
    thr: Vec<Vec<f32>>,
    /// `mass[f][j]`: rows below cut `j` and above cut `j − 1` (`j = len`: above
    /// the last cut).
    mass: Vec<Vec<f64>>,
}

impl Cuts {
    /// The cuts of the noisy grid counts (`cols` × [`GRID_BINS`], bins under the
    /// noise floor already 0): every grid edge between a feature's first and last
    /// non-empty bin whose standardised value lies inside the standardiser's clip.
    pub fn of(noisy: &[Vec<f64>], s: &Standardizer) -> Cuts {
        let mut cuts = Cuts::default();
        for (f, d) in noisy.iter().enumerate() {
            let (mut thr, mut mass, mut acc) = (Vec::new(), Vec::new(), 0.0);
            let filled = || d.iter().enumerate().filter(|(_, &n)| n > 0.0).map(|(b, _)| b);
            if let (Some(first), Some(last)) = (filled().next(), filled().last()) {
                for (b, &n) in d.iter().enumerate().take(GRID_BINS) {
                    if b > first && b <= last {
                        let t = (grid_lower_edge(b) - s.mean[f]) / s.sd[f];
                        // A value on the edge is in bin b: it must go right (x > thr).
                        let t = (t - 1e-6 * (1.0 + t.abs())) as f32;
                        if f64::from(t).abs() < crate::ensemble::CLIP && thr.last().is_none_or(|&p: &f32| t > p) {
                            thr.push(t);
                            mass.push(acc);
                            acc = 0.0;
                        }
                    }
                    acc += n;
                }
            }
            mass.push(acc);
            cuts.thr.push(thr);
            cuts.mass.push(mass);
        }
        let mut totals: Vec<f64> = cuts.mass.iter().map(|m| m.iter().sum()).collect();
        totals.sort_by(f64::total_cmp);
        cuts.rows = totals.get(totals.len() / 2).copied().unwrap_or(0.0);
        cuts
    }

    /// Features the cuts are for.
    pub fn features(&self) -> usize {
        self.thr.len()
    }

    /// A cut of feature `f` among cuts `lo..hi`, drawn in proportion to the
    /// mass of the node's range (segments `lo..=hi`); uniform when it is empty.
    fn pick(&self, f: usize, lo: usize, hi: usize, rng: &mut StdRng) -> usize {
        let seg = &self.mass[f][lo..=hi];
        let total: f64 = seg.iter().sum();
        if total <= 0.0 {
            return rng.random_range(lo..hi);
        }
        let u = rng.random::<f64>() * total;
        let mut cum = 0.0;
        for (j, m) in seg.iter().enumerate().take(hi - lo) {
            cum += m;
            if cum >= u {
                return lo + j;
            }
        }
        hi - 1
    }
}

/// Trees whose shape was drawn without rows, in pre-order: node `i` is a leaf
/// when `feat[i] == u32::MAX`, and then `left[i]` is its leaf number in its tree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Shapes {
    pub n_features: usize,
    pub roots: Vec<u32>,
    pub feat: Vec<u32>,
    pub thr: Vec<f32>,
    pub left: Vec<u32>,
    pub right: Vec<u32>,
    /// Leaves of each tree.
    pub leaves: Vec<u32>,
}

impl Shapes {
    /// `trees` trees of depth `depth` at most, drawn from `cuts` with `seed`.
    pub fn draw(cuts: &Cuts, trees: usize, depth: usize, seed: u64) -> Shapes {
        let mut s = Shapes { n_features: cuts.thr.len(), roots: vec![], feat: vec![], thr: vec![], left: vec![], right: vec![], leaves: vec![] };
        for t in 0..trees {
            let mut rng = StdRng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            s.roots.push(s.feat.len() as u32);
            let mut range: Vec<(usize, usize)> = cuts.thr.iter().map(|c| (0, c.len())).collect();
            let mut leaves = 0;
            s.grow(cuts, &mut rng, &mut range, depth, &mut leaves);
            s.leaves.push(leaves);
        }
        s
    }

    fn grow(&mut self, cuts: &Cuts, rng: &mut StdRng, range: &mut [(usize, usize)], depth: usize, leaves: &mut u32) -> u32 {
        let me = self.feat.len();
        self.feat.push(LEAF);
        self.thr.push(0.0);
        self.left.push(0);
        self.right.push(0);
        let open: Vec<usize> = (0..range.len()).filter(|&f| range[f].0 < range[f].1).collect();
        if depth == 0 || open.is_empty() {
            self.left[me] = *leaves;
            *leaves += 1;
            return me as u32;
        }
        let f = open[rng.random_range(0..open.len())];
        let (lo, hi) = range[f];
        let j = cuts.pick(f, lo, hi, rng);
        self.feat[me] = f as u32;
        self.thr[me] = cuts.thr[f][j];
        range[f] = (lo, j);
        let l = self.grow(cuts, rng, range, depth - 1, leaves);
        range[f] = (j + 1, hi);
        let r = self.grow(cuts, rng, range, depth - 1, leaves);
        range[f] = (lo, hi);
        self.left[me] = l;
        self.right[me] = r;
        me as u32
    }

    /// Leaf number in tree `t` of a standardised row (`x <= thr` goes left).
    pub fn leaf(&self, t: usize, row: &[f32]) -> usize {
        let mut n = self.roots[t] as usize;
        while self.feat[n] != LEAF {
            n = if row[self.feat[n] as usize] <= self.thr[n] { self.left[n] } else { self.right[n] } as usize;
        }
        self.left[n] as usize
    }

    /// Checks a site runs before walking its rows through shapes it was sent:
    /// every index in range, children after their parent (no cycle), leaf
    /// numbers below their tree's count.
    pub fn check(&self, n_features: usize) -> Result<(), String> {
        let n = self.feat.len();
        let same = [self.thr.len(), self.left.len(), self.right.len()].iter().all(|&l| l == n);
        if !same || self.roots.len() != self.leaves.len() || self.n_features != n_features {
            return Err(format!("malformed tree shapes ({} nodes, {} features; the site has {n_features})", n, self.n_features));
        }
        for (t, &root) in self.roots.iter().enumerate() {
            let mut stack = vec![root as usize];
            while let Some(i) = stack.pop() {
                if i >= n {
                    return Err(format!("tree {t}: node {i} of {n}"));
                }
                if self.feat[i] == LEAF {
                    if self.left[i] >= self.leaves[t] {
                        return Err(format!("tree {t}: leaf {} of {}", self.left[i], self.leaves[t]));
                    }
                    continue;
                }
                let (l, r) = (self.left[i] as usize, self.right[i] as usize);
                if self.feat[i] as usize >= n_features || l <= i || r <= i {
                    return Err(format!("tree {t}: node {i} splits on feature {} into {l} and {r}", self.feat[i]));
                }
                stack.extend([l, r]);
            }
        }
        Ok(())
    }

    /// The trees as flat arrays with leaves' `left` mapped by `leaf(tree, number)`.
    pub(crate) fn flat(&self, leaf: impl Fn(usize, u32) -> u32) -> (Vec<u32>, Vec<u32>) {
        let mut left = self.left.clone();
        let mut t = 0;
        for (i, l) in left.iter_mut().enumerate() {
            while t + 1 < self.roots.len() && i >= self.roots[t + 1] as usize {
                t += 1;
            }
            if self.feat[i] == LEAF {
                *l = leaf(t, *l);
            }
        }
        (left, self.right.clone())
    }
}

/// A site's class counts in the leaves of `shapes` over its rows `rows` of `x`
/// (labels `y`, `k` classes): per tree, the non-zero `(leaf · k + class, count)` cells.
pub fn leaf_counts(shapes: &Shapes, x: &Matrix, rows: &[usize], y: &[usize], k: usize) -> Result<Vec<Vec<(u32, u32)>>, String> {
    shapes.check(x.cols)?;
    let mut out = Vec::with_capacity(shapes.roots.len());
    for (t, &l) in shapes.leaves.iter().enumerate() {
        let mut cells = vec![0u32; l as usize * k];
        for &r in rows {
            cells[shapes.leaf(t, x.row(r)) * k + y[r]] += 1;
        }
        out.push(cells.iter().enumerate().filter(|(_, &c)| c > 0).map(|(i, &c)| (i as u32, c)).collect());
    }
    Ok(out)
}

/// A site's log-loss gradient and Hessian sums in the leaves of `shapes` at the
/// scores of `model` (none: log-odds 0): per tree and leaf, (Σg, Σ4h).
pub fn leaf_gradients(shapes: &Shapes, model: Option<&Booster>, x: &Matrix, rows: &[usize], y: &[bool]) -> Result<Vec<f64>, String> {
    shapes.check(x.cols)?;
    let mut out = Vec::new();
    let sub = x.select(rows);
    let mut p = vec![0.5f32; rows.len()];
    if let Some(m) = model {
        m.predict_rows(&sub.data, &mut p);
    }
    for (t, &l) in shapes.leaves.iter().enumerate() {
        let base = out.len();
        out.resize(base + 2 * l as usize, 0.0);
        for (i, &yi) in y.iter().enumerate() {
            let leaf = base + 2 * shapes.leaf(t, sub.row(i));
            let q = f64::from(p[i]);
            out[leaf] += q - if yi { 1.0 } else { 0.0 };
            out[leaf + 1] += 4.0 * q * (1.0 - q);
        }
    }
    Ok(out)
}

/// Per site with counts, how well its labels agree with the other sites' rows:
/// in each tree, the ROC-AUC of its normal against its attack rows when a
/// row's score is the other sites' normal share in its leaf (ties count half),
/// averaged over the trees; `None` for a site without both classes.
pub(crate) fn agreement(dense: &[Option<Vec<f64>>], leaves: &[u32], k: usize) -> Vec<Option<f64>> {
    let split = |d: &Vec<f64>| -> Vec<(f64, f64)> { d.chunks(k).map(|c| (c[0], c[1..].iter().sum())).collect() };
    let per: Vec<Option<Vec<(f64, f64)>>> = dense.iter().map(|d| d.as_ref().map(split)).collect();
    let mut total = vec![(0.0, 0.0); leaves.iter().map(|&l| l as usize).sum()];
    for p in per.iter().flatten() {
        for (t, v) in total.iter_mut().zip(p) {
            t.0 += v.0;
            t.1 += v.1;
        }
    }
    per.iter()
        .map(|p| {
            let p = p.as_ref()?;
            let (mut sum, mut trees, mut at) = (0.0, 0usize, 0usize);
            for &l in leaves {
                let range = at..at + l as usize;
                at += l as usize;
                // (others' normal share, own normal rows, own attack rows) per leaf.
                let mut cells: Vec<(f64, f64, f64)> = p[range.clone()]
                    .iter()
                    .zip(&total[range])
                    .map(|(&(n, a), &(tn, ta))| {
                        let o = (tn - n) + (ta - a);
                        (if o >= 1.0 { (tn - n) / o } else { 0.5 }, n, a)
                    })
                    .collect();
                cells.sort_by(|x, y| x.0.total_cmp(&y.0));
                let (normals, attacks): (f64, f64) = cells.iter().fold((0.0, 0.0), |s, c| (s.0 + c.1, s.1 + c.2));
                if normals <= 0.0 || attacks <= 0.0 {
                    continue;
                }
                let (mut below, mut pairs, mut i) = (0.0, 0.0, 0);
                while i < cells.len() {
                    // Leaves of one share together: their pairs tie.
                    let j = (i..cells.len()).find(|&j| cells[j].0 != cells[i].0).unwrap_or(cells.len());
                    let (n, a) = cells[i..j].iter().fold((0.0, 0.0), |s, c| (s.0 + c.1, s.1 + c.2));
                    pairs += n * (below + a / 2.0);
                    below += a;
                    i = j;
                }
                sum += pairs / (normals * attacks);
                trees += 1;
            }
            (trees > 0).then(|| sum / trees as f64)
        })
        .collect()
}

/// Per site with normal rows, per class `c` ≥ 1, the mean over its normal rows
/// of the other sites' share of class `c` in the row's leaf. A site that labels
/// an attack class normal (the targeted flip) has its "normal" rows where the
/// others hold that class.
pub(crate) fn normal_among(dense: &[Option<Vec<f64>>], k: usize) -> Vec<Option<Vec<f64>>> {
    let cells = dense.iter().flatten().map(Vec::len).next().unwrap_or(0);
    let mut total = vec![0.0; cells];
    for d in dense.iter().flatten() {
        total.iter_mut().zip(d).for_each(|(t, v)| *t += v);
    }
    dense
        .iter()
        .map(|d| {
            let d = d.as_ref()?;
            let (mut shares, mut normals) = (vec![0.0; k], 0.0);
            for (own, all) in d.chunks(k).zip(total.chunks(k)) {
                let others: f64 = all.iter().zip(own).map(|(a, o)| a - o).sum();
                if own[0] <= 0.0 || others < 1.0 {
                    continue;
                }
                normals += own[0];
                for c in 1..k {
                    shares[c] += own[0] * (all[c] - own[c]) / others;
                }
            }
            (normals > 0.0).then(|| shares.iter().map(|v| v / normals).collect())
        })
        .collect()
}

/// The dense counts of a site's answer, or why it is refused: cells in range,
/// the same rows in every tree, no more than it declared in round 0.
pub(crate) fn dense_counts(reply: &Answer, leaves: &[u32], k: usize, declared: usize) -> Result<Vec<f64>, String> {
    let Answer::LeafCounts(trees) = reply else { return Err("answered something other than leaf counts".into()) };
    if trees.len() != leaves.len() {
        return Err(format!("counts for {} trees, {} were sent", trees.len(), leaves.len()));
    }
    let mut dense = Vec::new();
    let mut rows = None;
    for (t, (cells, &l)) in trees.iter().zip(leaves).enumerate() {
        let base = dense.len();
        dense.resize(base + l as usize * k, 0.0);
        let mut sum = 0u64;
        for &(c, n) in cells {
            *dense.get_mut(base + c as usize).filter(|_| (c as usize) < l as usize * k).ok_or_else(|| format!("tree {t}: cell {c} of {}", l as usize * k))? += f64::from(n);
            sum += u64::from(n);
        }
        if *rows.get_or_insert(sum) != sum || sum > declared as u64 {
            return Err(format!("tree {t} counts {sum} rows; tree 0 counts {}, round 0 declared {declared}", rows.unwrap_or(0)));
        }
    }
    Ok(dense)
}

#[cfg(test)]
#[path = "private_trees_tests.rs"]
mod tests;
