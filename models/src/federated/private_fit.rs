//! The aggregator's side of the private trees ([`super::private_trees`]): the
//! shapes sent, the sites' sums checked and screened, Gaussian noise added once,
//! the leaves set.

use std::time::Instant;

use super::aggregate::Aggregator;
use super::privacy::{gaussian, rho_for_epsilon, MemberPrivacy, PrivacyReport};
use super::private_trees::{agreement, dense_counts, depth_for, normal_among, Cuts, Shapes, BOOST_DEPTH, BOOST_RATE, BOOST_ROUNDS, BOOST_TREES, CLASS_FLOOR, CLASS_MARGIN, FOREST_DEPTH, LEAF, SCREEN_MARGIN};
use super::protocol::{Answer, Task};
use super::robust::{spread, Decision};
use crate::boost::Booster;
use crate::forest::Forest;
use crate::train::Progress;
use crate::walk::Flat;
use crate::ModelError;

/// The first leaf of each tree when the trees' leaves are numbered in a row.
fn leaf_offsets(leaves: &[u32]) -> Vec<u32> {
    leaves.iter().scan(0u32, |next, &l| Some(std::mem::replace(next, *next + l))).collect()
}

/// Concatenate shapes into flat booster arrays (leaves' values from `values`,
/// one per leaf in tree order).
fn append_booster(parts: &mut (Vec<u32>, Vec<u32>, Vec<f32>, Vec<u32>, Vec<u32>, Vec<f32>), s: &Shapes, values: &[f32]) {
    let node0 = parts.1.len() as u32;
    let offsets = leaf_offsets(&s.leaves);
    // A leaf's `left` becomes its number among all the shapes' leaves.
    let (left, right) = s.flat(|t, l| offsets[t] + l);
    parts.0.extend(s.roots.iter().map(|r| r + node0));
    for i in 0..s.feat.len() {
        let leaf = s.feat[i] == LEAF;
        parts.1.push(s.feat[i]);
        parts.2.push(s.thr[i]);
        parts.3.push(if leaf { 0 } else { left[i] + node0 });
        parts.4.push(if leaf { 0 } else { right[i] + node0 });
        parts.5.push(if leaf { values[left[i] as usize] } else { 0.0 });
    }
}

impl Aggregator<'_> {
    /// Expel site `i` from the rest of the federation at `stage` (robust
    /// rules, and while more than two sites remain): it is asked nothing more,
    /// and every later member's decision says where and why.
    pub(super) fn expel(&mut self, i: usize, stage: &str, why: String, log: &mut dyn FnMut(Progress<'_>)) -> bool {
        if !self.robust || self.active.len() <= 2 || !self.active.contains(&i) {
            return false;
        }
        log(Progress::Step(&format!("site {i} is expelled from the federation: {why}")));
        self.active.retain(|&a| a != i);
        self.expelled.insert(i, format!("at {stage}: {why}"));
        true
    }

    fn dp_cost(&mut self, member: &str, cost: MemberPrivacy) {
        let p = self.report.privacy.get_or_insert_with(PrivacyReport::new);
        p.members.insert(member.into(), cost);
        p.not_private.remove(member);
    }

    /// Screen the sites' dense counts (robust rules only; the module doc of
    /// [`super::private_trees`]): expel a site whose labels rank against the
    /// other sites' rows in the same leaves (AUC far under the median), or whose
    /// normal rows sit among the others' rows of one attack class far more than
    /// the median site's. Sites without counts keep their `reasons`. Returns
    /// the decisions.
    fn screen_counts(&mut self, dense: &mut [Option<Vec<f64>>], reasons: &[String], leaves: &[u32], k: usize, log: &mut dyn FnMut(Progress<'_>)) -> Vec<Decision> {
        let shares = agreement(dense, leaves, k);
        let (median, mad) = spread(shares.iter().flatten().copied());
        let bound = median - (3.0 * mad).max(SCREEN_MARGIN);
        // Per attack class, how far above the median site's a site's normal rows
        // sit among the others' rows of that class.
        let among = normal_among(dense, k);
        let class_bounds: Vec<f64> = (0..k)
            .map(|c| {
                let (m, d) = spread(among.iter().flatten().map(|v| v[c]));
                m + (3.0 * d).max(CLASS_MARGIN * m).max(CLASS_FLOOR)
            })
            .collect();
        let mut decisions = Vec::new();
        for i in 0..dense.len() {
            let share = shares[i].unwrap_or(f64::NAN);
            let flipped = among[i].as_ref().and_then(|v| (1..k).filter(|&c| v[c] > class_bounds[c]).max_by(|&a, &b| (v[a] - class_bounds[a]).total_cmp(&(v[b] - class_bounds[b]))));
            let why = match (shares[i], flipped) {
                (Some(s), _) if s < bound => Some(format!("its labels disagree with the other sites' rows in the same leaves: AUC {s:.3} under {bound:.3} (median {median:.3})")),
                (_, Some(c)) => Some(format!(
                    "its normal rows sit among the other sites' {} rows: share {:.3} above {:.3}",
                    self.classes.get(c).map_or("?", String::as_str),
                    among[i].as_ref().map_or(0.0, |v| v[c]),
                    class_bounds[c]
                )),
                _ => None,
            };
            let (accepted, reason) = match (&dense[i], why) {
                (None, _) => (false, reasons[i].clone()),
                (Some(_), Some(why)) if self.expel(i, "the forest screen", why.clone(), log) => {
                    dense[i] = None;
                    (false, why)
                }
                (Some(d), _) => (true, format!("{:.0} rows a tree; AUC against the others' leaves {share:.3} (bound {bound:.3})", d.iter().sum::<f64>() / self.opts.forest.trees.max(1) as f64)),
            };
            decisions.push(Decision { site: i, accepted, score: share, reason });
        }
        decisions
    }

    /// The private forest: shapes drawn from the noisy grid, leaves from the
    /// accepted sites' summed class counts with Gaussian noise.
    pub(crate) fn private_forest(&mut self, cuts: &Cuts, k: usize, log: &mut dyn FnMut(Progress<'_>)) -> Result<Forest, ModelError> {
        let t0 = Instant::now();
        let dp = self.plan.dp.clone().ok_or_else(|| ModelError::Train("private forest without a privacy plan".into()))?;
        let trees = self.opts.forest.trees.max(1);
        let rho = rho_for_epsilon(dp.trees_epsilon, dp.delta)?;
        let sensitivity = (trees as f64).sqrt();
        let sd = sensitivity / (2.0 * rho).sqrt();
        let depth = depth_for(cuts.rows, sd, FOREST_DEPTH);
        let shapes = Shapes::draw(cuts, trees, depth, self.opts.forest.seed);
        let replies = self.ask(&Task::LeafCounts(shapes.clone()))?;
        let mut reasons = vec![String::new(); replies.len()];
        let mut dense: Vec<Option<Vec<f64>>> = Vec::new();
        for (i, r) in replies.iter().enumerate() {
            let d = match r {
                _ if !self.active.contains(&i) => Err(self.absent(i)),
                Err(e) => Err(e.clone()),
                // Counts no honest site's rows can give (more rows than it
                // declared, trees that disagree on its row count, cells out of
                // range): the site lies about its data, so nothing else it
                // sends (score histograms included) can be trusted either.
                Ok(a) => dense_counts(a, &shapes.leaves, k, self.report.sites[i].train_rows).map_err(|e| {
                    let why = format!("its leaf counts are impossible for its rows: {e}");
                    if self.expel(i, "the forest screen", why.clone(), log) { why } else { e }
                }),
            };
            dense.push(d.map_err(|e| reasons[i] = e).ok());
        }
        let decisions = self.screen_counts(&mut dense, &reasons, &shapes.leaves, k, log);
        let mut sum = vec![0.0; shapes.leaves.iter().map(|&l| l as usize * k).sum()];
        for d in dense.iter().flatten() {
            sum.iter_mut().zip(d).for_each(|(s, v)| *s += v);
        }
        if dense.iter().flatten().next().is_none() {
            return Err(ModelError::Train("no site's leaf counts were accepted".into()));
        }
        let spent = gaussian(&mut sum, sd, sensitivity)?;
        // Leaves from the noisy counts (negatives as 0), shrunk with the weight
        // of 2σ rows to a prior of even odds, normal against attack (the attack
        // half split as the tree's attack classes): an empty leaf says 0.5, not
        // the attack-heavy base rate that would push every normal score up.
        let mut proba = Vec::with_capacity(sum.len());
        let mut at = 0;
        for &l in &shapes.leaves {
            let tree = &sum[at..at + l as usize * k];
            let mut prior = vec![0.0; k];
            tree.chunks(k).for_each(|c| prior.iter_mut().zip(c).for_each(|(p, v)| *p += v.max(0.0)));
            let attacks: f64 = prior[1..].iter().sum();
            for (c, p) in prior.iter_mut().enumerate() {
                *p = if c == 0 { 0.5 } else if attacks > 0.0 { 0.5 * *p / attacks } else { 0.5 / (k - 1).max(1) as f64 };
            }
            for c in tree.chunks(k) {
                let w: f64 = c.iter().map(|v| v.max(0.0)).sum::<f64>() + 2.0 * sd;
                proba.extend(c.iter().zip(&prior).map(|(v, p)| ((v.max(0.0) + 2.0 * sd * p) / w) as f32));
            }
            at += l as usize * k;
        }
        let offsets = leaf_offsets(&shapes.leaves);
        let (left, right) = shapes.flat(|t, l| offsets[t] + l);
        let flat = Flat { roots: &shapes.roots, feat: &shapes.feat, thr: &shapes.thr, left: &left, right: &right };
        let forest = Forest::from_flat(k, shapes.n_features, flat, proba);
        let mechanism = format!("{trees} trees of depth {depth} drawn without rows; Gaussian noise (σ {sd:.1}) on the sites' summed class counts per leaf");
        self.dp_cost("rf", MemberPrivacy::record(mechanism, 1, sd, spent, dp.delta)?);
        let kept = decisions.iter().filter(|d| d.accepted).count();
        log(Progress::Step(&format!("forest (private): {trees} trees of depth {depth} from {kept} sites' leaf counts, σ {sd:.1}, in {:.1} s", t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("rf".into(), decisions);
        Ok(forest)
    }

    /// The private boosted trees: [`BOOST_ROUNDS`] rounds of [`BOOST_TREES`]
    /// shapes each, leaves a Newton step from the sites' summed gradient sums
    /// with Gaussian noise (the step shrunk by λ = σ).
    pub(crate) fn private_boost(&mut self, cuts: &Cuts, log: &mut dyn FnMut(Progress<'_>)) -> Result<Booster, ModelError> {
        let t0 = Instant::now();
        let dp = self.plan.dp.clone().ok_or_else(|| ModelError::Train("private boosting without a privacy plan".into()))?;
        let rho = rho_for_epsilon(dp.trees_epsilon, dp.delta)?;
        let sensitivity = (2.0 * BOOST_TREES as f64).sqrt();
        let sd = (BOOST_ROUNDS as f64 * sensitivity * sensitivity / (2.0 * rho)).sqrt();
        let depth = depth_for(cuts.rows, sd, BOOST_DEPTH);
        let mut parts = Default::default();
        let mut model: Option<Booster> = None;
        let mut spent = 0.0;
        let mut refused: Vec<Option<String>> = vec![None; self.link.sites()];
        for round in 0..BOOST_ROUNDS {
            let shapes = Shapes::draw(cuts, BOOST_TREES, depth, self.opts.boost.seed ^ (round as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407));
            let leaves: usize = shapes.leaves.iter().map(|&l| l as usize).sum();
            let to: Vec<usize> = self.active.iter().copied().filter(|&i| refused[i].is_none()).collect();
            let replies = self.ask_some(&to, &Task::LeafGradients { shapes: shapes.clone(), model: model.clone() })?;
            let mut sum = vec![0.0; 2 * leaves];
            for &i in &to {
                let rows = self.report.sites[i].train_rows as f64;
                let ok = match &replies[i] {
                    Ok(Answer::LeafSums(v)) if v.len() == sum.len() && v.iter().all(|x| x.is_finite()) => {
                        // Per tree, |g| ≤ 1 and 0 ≤ 4h ≤ 1 a row: neither sum beyond the rows.
                        let mut at = 0;
                        let bad = shapes.leaves.iter().any(|&l| {
                            let tree = &v[at..at + 2 * l as usize];
                            at += 2 * l as usize;
                            let (g, h) = tree.chunks(2).fold((0.0, 0.0), |a, c| (a.0 + c[0].abs(), a.1 + c[1]));
                            tree.chunks(2).any(|c| c[1] < 0.0) || g > rows + 1e-6 || h > rows + 1e-6
                        });
                        // Sums beyond its own rows: it lies about its data (as
                        // the forest's count screen, it is expelled).
                        if bad { Err((format!("round {round}: its gradient sums exceed the {rows} rows it declared"), true)) } else { Ok(v) }
                    }
                    Ok(_) => Err((format!("round {round}: answered something other than {} gradient sums", sum.len()), false)),
                    Err(e) => Err((format!("round {round}: {e}"), false)),
                };
                match ok {
                    Ok(v) => sum.iter_mut().zip(v).for_each(|(s, x)| *s += x),
                    Err((e, lied)) => {
                        if lied {
                            self.expel(i, "private boosting", format!("its gradient sums are impossible for its rows: {e}"), log);
                        }
                        refused[i] = Some(e)
                    }
                }
            }
            if to.iter().all(|&i| refused[i].is_some()) {
                return Err(ModelError::Train(format!("private boosting, round {round}: no site's gradient sums were accepted")));
            }
            spent += gaussian(&mut sum, sd, sensitivity)?;
            let lambda = sd.max(self.opts.boost.l2);
            let values: Vec<f32> = sum.chunks(2).map(|c| (-c[0] / (c[1].max(0.0) / 4.0 + lambda) * BOOST_RATE / BOOST_TREES as f64) as f32).collect();
            append_booster(&mut parts, &shapes, &values);
            let (r, f, t, l, rt, v) = &parts;
            model = Some(Booster::from_flat(cuts.features(), 0.0, Flat { roots: r, feat: f, thr: t, left: l, right: rt }, v.clone()));
        }
        let decisions = (0..self.link.sites())
            .map(|i| match (&refused[i], self.active.contains(&i)) {
                (_, false) => Decision { site: i, accepted: false, score: f64::NAN, reason: self.absent(i) },
                (Some(e), _) => Decision { site: i, accepted: false, score: f64::NAN, reason: e.clone() },
                (None, _) => Decision { site: i, accepted: true, score: f64::NAN, reason: format!("gradient sums in all {BOOST_ROUNDS} rounds") },
            })
            .collect();
        let mechanism = format!("{BOOST_ROUNDS} rounds of {BOOST_TREES} trees of depth {depth} drawn without rows; Gaussian noise (σ {sd:.1}) on the sites' summed (g, 4h) per leaf");
        self.dp_cost("gbdt", MemberPrivacy::record(mechanism, BOOST_ROUNDS, sd, spent, dp.delta)?);
        log(Progress::Step(&format!("boosted trees (private): {} trees over {BOOST_ROUNDS} rounds, σ {sd:.1}, in {:.1} s", BOOST_ROUNDS * BOOST_TREES, t0.elapsed().as_secs_f64())));
        self.report.decisions.insert("gbdt".into(), decisions);
        model.ok_or_else(|| ModelError::Train("no boosting round".into()))
    }
}
