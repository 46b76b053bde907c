//! The threshold from merged score histograms: each site counts its validation
//! rows' scores into fixed bins on the log-odds scale (where the probabilities
//! near 0 and 1 that decide a 1 % FPR are spread out; an SVM margin is binned as
//! it is), the aggregator adds the counts and sets the threshold conformally, as
//! [`metrics::threshold_for_fpr`](crate::metrics::threshold_for_fpr) does on raw
//! scores. No site's scores are kept in the artifact, only the summed counts.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::metrics::FprInterval;
use crate::ModelError;

/// Bins over the log-odds range [−`LOGIT_RANGE`, `LOGIT_RANGE`].
pub const BINS: usize = 2000;
const LOGIT_RANGE: f64 = 16.0;

/// Counts of normal and attack scores per bin.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScoreHistogram {
    pub normal: Vec<u64>,
    pub attack: Vec<u64>,
}

/// Log-odds of a probability (the scale the histograms bin).
pub fn logit(p: f64) -> f64 {
    let p = p.clamp(1e-12, 1.0 - 1e-12);
    (p / (1.0 - p)).ln()
}

/// The probability of a log-odds value.
pub fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

fn bin_of(z: f64) -> usize {
    let z = if z.is_nan() { -LOGIT_RANGE } else { z.clamp(-LOGIT_RANGE, LOGIT_RANGE) };
    (((z + LOGIT_RANGE) / (2.0 * LOGIT_RANGE) * BINS as f64).floor() as usize).min(BINS - 1)
}

/// The lower edge of bin `b` (log-odds), nudged up so that it falls in bin `b`.
pub(crate) fn lower_edge(b: usize) -> f64 {
    let z = -LOGIT_RANGE + 2.0 * LOGIT_RANGE * b as f64 / BINS as f64;
    if bin_of(z) < b { z.next_up() } else { z }
}

/// The centre of bin `b` (log-odds).
pub(crate) fn bin_center(b: usize) -> f64 {
    -LOGIT_RANGE + 2.0 * LOGIT_RANGE * (b as f64 + 0.5) / BINS as f64
}

impl Default for ScoreHistogram {
    fn default() -> Self {
        ScoreHistogram { normal: vec![0; BINS], attack: vec![0; BINS] }
    }
}

impl ScoreHistogram {
    /// Count the scores (log-odds, or an SVM margin) of normal and attack rows.
    pub fn of(z: &[f64], attack: &[bool]) -> ScoreHistogram {
        let mut h = ScoreHistogram::default();
        for (&s, &a) in z.iter().zip(attack) {
            let b = bin_of(s);
            if a {
                h.attack[b] += 1;
            } else {
                h.normal[b] += 1;
            }
        }
        h
    }

    /// Add another site's counts.
    pub fn add(&mut self, o: &ScoreHistogram) -> Result<(), ModelError> {
        if o.normal.len() != BINS || o.attack.len() != BINS {
            return Err(ModelError::Data(format!("a score histogram has {BINS} bins, got {} and {}", o.normal.len(), o.attack.len())));
        }
        self.normal.iter_mut().zip(&o.normal).for_each(|(a, b)| *a += b);
        self.attack.iter_mut().zip(&o.attack).for_each(|(a, b)| *a += b);
        Ok(())
    }

    pub fn normals(&self) -> u64 {
        self.normal.iter().sum()
    }

    /// Normal counts in `threshold`'s bin (log-odds) and above.
    pub fn normals_above(&self, threshold: f64) -> u64 {
        self.normal[bin_of(threshold)..].iter().sum()
    }

    pub fn attacks(&self) -> u64 {
        self.attack.iter().sum()
    }

    /// Attack counts in `threshold`'s bin (log-odds) and above.
    pub fn attacks_above(&self, threshold: f64) -> u64 {
        self.attack[bin_of(threshold)..].iter().sum()
    }

    /// The lowest bin edge (log-odds) with at most k = ⌊fpr·(n+1)⌋ normal scores
    /// in the bins at or above it (a score in the edge's own bin counts as above:
    /// conservative by at most one bin's width, 0.016 in log-odds). Above every
    /// bin (+∞) when even the top bin holds more than k.
    pub fn threshold_for_fpr(&self, fpr: f64) -> Result<f64, ModelError> {
        let n = self.normals();
        if n == 0 {
            return Err(ModelError::Data("no normal validation rows at any site: the threshold cannot be set".into()));
        }
        let k = (fpr * (n + 1) as f64).floor() as u64;
        let mut above = 0u64;
        let mut b = BINS;
        while b > 0 && above + self.normal[b - 1] <= k {
            above += self.normal[b - 1];
            b -= 1;
        }
        Ok(if b == BINS { f64::INFINITY } else { lower_edge(b) })
    }
}

/// The fewest normal rows on which a site's own conformal threshold for `target`
/// leaves a normal row above it (k = ⌊target·(n+1)⌋ ≥ 1): 99 at 1 %.
pub fn judging_normals(target: f64) -> u64 {
    ((1.0 / target).ceil() as u64).saturating_sub(1).max(1)
}

/// How sure the aggregator must be that a site's normal traffic runs above the
/// target at the pooled threshold before it raises the threshold for that site:
/// a one-sided binomial test at this level, divided among the sites that can
/// judge alone (Bonferroni), so sites whose scores differ only by sampling lift it
/// in at most 5 % of federations.
pub const SITE_EVIDENCE: f64 = 0.05;

/// A threshold that holds the target on every site's own rows, and what set it.
#[derive(Debug, Clone, PartialEq)]
pub struct EverySite {
    /// The threshold (log-odds, or an SVM margin).
    pub z: f64,
    /// Per site: P(this many or more of its normal rows at or above the pooled
    /// threshold | its FPR there is the target); None where its normal rows are
    /// too few to judge alone ([`judging_normals`]).
    pub p: Vec<Option<f64>>,
    /// Per site: its own threshold for the target, where the test says its
    /// traffic runs above the target at the pooled threshold (the lift it gets
    /// may stop below it: [`LIFT_BUDGET`]).
    pub own: Vec<Option<f64>>,
    /// The site whose own threshold was taken; None when the pooled one was.
    pub set_by: Option<usize>,
}

impl EverySite {
    /// What the rule found at the `j`-th site given it (with `normals` normal
    /// rows), for that site's decision.
    pub fn note(&self, j: usize, normals: u64, target: f64) -> String {
        match (self.p[j], self.own[j]) {
            (Some(p), Some(z)) => format!("; its {normals} normal rows run above FPR {target} at the pooled threshold (p = {p:.2e}): its own threshold {:.4}", sigmoid(z)),
            (Some(p), None) => format!("; its {normals} normal rows hold FPR {target} at the pooled threshold (p = {p:.2})"),
            _ => format!("; {normals} normal rows: too few to judge FPR {target} alone"),
        }
    }
}

/// The threshold for `target` that holds it on the pooled histogram and on each
/// site's own (`sites`, in site order) where the site's normal rows show it is
/// needed: a site that can judge alone and whose normal rows at the pooled
/// threshold are significantly more than the target allows ([`SITE_EVIDENCE`])
/// gets its own conformal threshold, as far as the other sites' detection allows
/// ([`LIFT_BUDGET`]); the highest of those is taken when above the pooled one. A
/// site that differs (another period, another mix of devices) then keeps its
/// false-positive rate, or as much of it as one point of the others' detection
/// buys; one that differs only by sampling moves nothing.
pub fn every_site_threshold(pooled: f64, sites: &[&ScoreHistogram], target: f64) -> EverySite {
    let min = judging_normals(target);
    let judging = sites.iter().filter(|h| h.normals() >= min).count().max(1);
    let p: Vec<Option<f64>> = sites.iter().map(|h| (h.normals() >= min).then(|| crate::metrics::binomial_sf(h.normals_above(pooled), h.normals(), target))).collect();
    let own: Vec<Option<f64>> = sites
        .iter()
        .zip(&p)
        .map(|(h, p)| match p {
            Some(p) if *p <= SITE_EVIDENCE / judging as f64 => h.threshold_for_fpr(target).ok().filter(|z| z.is_finite()),
            _ => None,
        })
        .collect();
    let lifts = own.iter().enumerate().filter_map(|(s, z)| z.filter(|&z| z > pooled).map(|z| (lift_within_budget(sites, s, pooled, z), s)));
    match lifts.max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1))) {
        Some((z, site)) if z > pooled => EverySite { z, p, own, set_by: Some(site) },
        _ => EverySite { z: pooled, p, own, set_by: None },
    }
}

/// The most detection one site's lift may cost the others: 1 point of the median
/// other site's validation DR (the bar for what a defence may cost in
/// clean DR). It bounds what a site that lies about its normal scores can take;
/// an honest site whose traffic differs gets as much of its own threshold as
/// that allows.
pub const LIFT_BUDGET: f64 = 0.01;

/// Attack rows a site needs for its detection rate to price a lift.
pub const PRICING_ATTACKS: u64 = 20;

/// The median, over the sites other than `s` with [`PRICING_ATTACKS`], of the
/// share of their attack rows at or above `pooled` but not at or above `z`;
/// None when no other site can price.
pub fn lift_price(sites: &[&ScoreHistogram], s: usize, pooled: f64, z: f64) -> Option<f64> {
    let mut costs: Vec<f64> = (0..sites.len())
        .filter(|&j| j != s && sites[j].attacks() >= PRICING_ATTACKS)
        .map(|j| sites[j].attacks_above(pooled).saturating_sub(sites[j].attacks_above(z)) as f64 / sites[j].attacks() as f64)
        .collect();
    (!costs.is_empty()).then(|| super::robust::median(&mut costs))
}

/// The highest threshold from `pooled` up to site `s`'s own `z` whose
/// [`lift_price`] stays within [`LIFT_BUDGET`] (bin edges in between; `pooled`
/// when no other site can price a lift).
fn lift_within_budget(sites: &[&ScoreHistogram], s: usize, pooled: f64, z: f64) -> f64 {
    let fits = |t: f64| lift_price(sites, s, pooled, t).is_some_and(|c| c <= LIFT_BUDGET);
    if fits(z) {
        return z;
    }
    // The price only grows with the threshold: bisect the bins between.
    let (mut lo, mut hi) = (bin_of(pooled), bin_of(z));
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(lower_edge(mid)) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    if lo == bin_of(pooled) { pooled } else { lower_edge(lo) }
}

/// One federation site's own threshold for the model's target FPR, from its own
/// normal validation rows (its score histogram): what the other sites report
/// cannot move it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SiteThreshold {
    /// None where the site has too few normal validation rows to set one alone
    /// ([`judging_normals`]): it scores at the
    /// federation's threshold.
    pub threshold: Option<f64>,
    /// The site's own normal validation rows against the threshold it scores at.
    pub fpr: FprInterval,
}

/// Each site's own threshold for `target` (a probability) from its own
/// histogram, where it has the normal rows to set one alone ([`judging_normals`]);
/// the others, and sites with no histogram (expelled, or unanswered), score at
/// the federation's `z`, their law taken there. Keyed by the sites' `names`.
pub fn site_thresholds(names: &[String], hists: &[Option<&ScoreHistogram>], z: f64, target: f64) -> BTreeMap<String, SiteThreshold> {
    let law = |h: Option<&ScoreHistogram>, t: f64| {
        let (n, above) = h.map_or((0, 0), |h| (h.normals() as usize, h.normals_above(t) as usize));
        FprInterval::from_counts(above, n, 0.9)
    };
    names
        .iter()
        .zip(hists)
        .map(|(name, &h)| {
            let own = h.filter(|h| h.normals() >= judging_normals(target)).and_then(|h| h.threshold_for_fpr(target).ok()).filter(|t| t.is_finite());
            let st = SiteThreshold { threshold: own.map(sigmoid), fpr: law(h, own.unwrap_or(z)) };
            (name.clone(), st)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_hold_the_target_like_the_raw_scores() {
        // 2,000 normal scores spread over (0, 1); 1 % FPR allows k = 20 above.
        let scores: Vec<f64> = (0..2000).map(|i| ((i * 7919 % 2000) as f64 + 0.5) / 2000.0).collect();
        let labels = vec![false; 2000];
        let mut merged = ScoreHistogram::default();
        for part in scores.chunks(700).zip(labels.chunks(700)) {
            let z: Vec<f64> = part.0.iter().map(|&p| logit(p)).collect();
            merged.add(&ScoreHistogram::of(&z, part.1)).unwrap();
        }
        let zt = merged.threshold_for_fpr(0.01).unwrap();
        let t = sigmoid(zt);
        let above = scores.iter().filter(|&&s| logit(s) >= zt).count();
        assert!((15..=20).contains(&above), "{above} normals at or above {t}");
        assert_eq!(merged.normals_above(zt), above as u64);
        let raw = crate::metrics::threshold_for_fpr(&scores, 0.01);
        assert!((t - raw).abs() < 0.01, "histogram {t} vs raw {raw}");
        assert!(ScoreHistogram::default().threshold_for_fpr(0.01).is_err());
    }

    /// `n` normal scores spread evenly over [−4, 2] + `shift` and 100 attack
    /// scores over [5, 11] (log-odds).
    fn site(n: usize, shift: f64) -> ScoreHistogram {
        let mut z: Vec<f64> = (0..n).map(|i| -4.0 + 6.0 * ((i * 7919 % n) as f64 + 0.5) / n as f64 + shift).collect();
        z.extend((0..100).map(|i| 5.0 + 0.06 * i as f64));
        let attack: Vec<bool> = (0..n + 100).map(|i| i >= n).collect();
        ScoreHistogram::of(&z, &attack)
    }

    fn pooled(hs: &[&ScoreHistogram]) -> f64 {
        let mut m = ScoreHistogram::default();
        hs.iter().for_each(|h| m.add(h).unwrap());
        m.threshold_for_fpr(0.01).unwrap()
    }

    #[test]
    fn every_site_holds_the_target_where_a_sites_traffic_differs_and_not_for_sampling_noise() {
        // Sites 0, 1 and 4 draw from one law (site 4: 120 normals, its own 1 %
        // threshold above the pooled one by sampling alone); site 2's normal traffic
        // scores higher (another period); site 3 has 50 normals (too few to judge
        // alone at 1 %).
        let hs = [site(400, 0.0), site(400, 0.0), site(400, 1.5), site(50, 0.5), site(120, 0.1)];
        let refs: Vec<&ScoreHistogram> = hs.iter().collect();
        let zp = pooled(&refs);
        // Pooled, the shifted site runs at over twice the target.
        assert!(hs[2].normals_above(zp) >= 10, "{}", hs[2].normals_above(zp));
        let e = every_site_threshold(zp, &refs, 0.01);
        assert_eq!(e.set_by, Some(2));
        assert!(e.p[2].unwrap() < 0.01 && e.p[3].is_none(), "{:?}", e.p);
        for h in &hs[..3] {
            assert!(h.normals_above(e.z) <= 4, "{} of 400 above", h.normals_above(e.z));
        }
        assert_eq!(lift_price(&refs, 2, zp, e.z), Some(0.0), "the attacks all score above both");
        assert!(e.own[4].is_none(), "{:?}", e.p);
        // Without the shifted site: the small site's own threshold is above the
        // pooled one by sampling alone, and lifts nothing.
        let same: Vec<&ScoreHistogram> = [&hs[0], &hs[1], &hs[4]].into();
        let zp = pooled(&same);
        assert!(hs[4].threshold_for_fpr(0.01).unwrap() > zp, "the noise case is not exercised");
        let e = every_site_threshold(zp, &same, 0.01);
        assert_eq!((e.set_by, e.z), (None, zp));
        assert!(e.p[2].unwrap() > 0.1, "{:?}", e.p);
        assert_eq!(judging_normals(0.01), 99);
        assert_eq!(judging_normals(0.05), 19);
    }

    #[test]
    fn a_site_that_claims_high_scoring_normal_rows_takes_at_most_the_lift_budget() {
        // Site 3 reports 120 normal rows, 5 of them scoring above every attack: its
        // own threshold would detect nothing anywhere.
        let mut liar = site(115, 0.0);
        liar.add(&ScoreHistogram::of(&[14.0; 5], &[false; 5])).unwrap();
        let hs = [site(400, 0.0), site(400, 0.0), site(400, 0.0), liar];
        let refs: Vec<&ScoreHistogram> = hs.iter().collect();
        let zp = pooled(&refs);
        let e = every_site_threshold(zp, &refs, 0.01);
        assert_eq!(e.set_by, Some(3));
        assert!(e.own[3].unwrap() > 13.0 && e.z < 6.0, "own {:?}, taken {}", e.own[3], e.z);
        for h in &hs[..3] {
            let kept = h.attacks_above(e.z) as f64 / h.attacks_above(zp) as f64;
            assert!((1.0 - LIFT_BUDGET..1.0).contains(&kept), "{kept} of the detected attacks kept");
        }
        // Nobody else can price a lift (too few attack rows): no lift at all.
        let bare = |n| ScoreHistogram::of(&(0..n).map(|i| -4.0 + 6.0 * i as f64 / n as f64).collect::<Vec<_>>(), &vec![false; n]);
        let (a, b) = (bare(400), bare(400));
        let refs = [&a, &b, &hs[3]];
        let zp = pooled(&refs);
        assert_eq!(every_site_threshold(zp, &refs, 0.01).z, zp);
    }

    #[test]
    fn a_site_sets_its_own_threshold_from_its_own_rows_and_a_small_site_scores_at_the_federations() {
        // Site 0: 500 normals spread over (0, 0.5); site 1: 40 normals; site 2:
        // claims its normals all score at the top (it binds only itself).
        let spread = |n: usize, top: f64| -> Vec<f64> { (0..n).map(|i| top * (i as f64 + 0.5) / n as f64).collect() };
        let h0 = ScoreHistogram::of(&spread(500, 0.5).iter().map(|&p| logit(p)).collect::<Vec<_>>(), &[false; 500]);
        let h1 = ScoreHistogram::of(&spread(40, 0.5).iter().map(|&p| logit(p)).collect::<Vec<_>>(), &[false; 40]);
        let h2 = ScoreHistogram::of(&[logit(0.999); 300], &[false; 300]);
        let names: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let z = logit(0.9);
        let t = site_thresholds(&names, &[Some(&h0), Some(&h1), Some(&h2), None], z, 0.01);
        let own = t["a"].threshold.expect("500 normal rows set their own");
        assert!(own > 0.48 && own < 0.5, "{own}: its 1 % tail is just under 0.5");
        assert!(t["a"].fpr.above <= 5 && t["a"].fpr.normals == 500);
        assert_eq!(t["b"].threshold, None, "40 normal rows are too few at 1 %");
        assert_eq!((t["b"].fpr.normals, t["b"].fpr.above), (40, 0), "its law at the federation's threshold");
        assert!(t["c"].threshold.unwrap() > 0.99);
        assert_eq!((t["d"].threshold, t["d"].fpr.normals), (None, 0));
        // Site a's own threshold is the same whatever site c claims.
        let h2b = ScoreHistogram::of(&[logit(0.2); 300], &[false; 300]);
        assert_eq!(site_thresholds(&names, &[Some(&h0), Some(&h1), Some(&h2b), None], z, 0.01)["a"], t["a"]);
    }
}
