//! Robust aggregation of vector updates and the screen for tree updates.
//!
//! Rules over one vector per site (an SVM hyperplane, an LSTM weight delta, a
//! stacker): the mean (undefended), the coordinate-wise median and trimmed mean
//! (Yin et al. 2018), Multi-Krum (Blanchard et al. 2017; selection as Flower's
//! `multikrum.py`: a site's score is the sum of squared distances to its
//! `n − f − 2` nearest others, the `n − f` lowest scores are averaged), and the
//! default: every update clipped to the median norm first (Sun et al. 2019: a
//! boosted update cannot outweigh the others), then Multi-Krum made adaptive (it
//! keeps the updates within 3 MAD of the median score, or twice it, too). No rule weights by a
//! site's self-reported row count.

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// An aggregation rule for vector updates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// Plain mean (FedAvg without row weights): no defence.
    Mean,
    /// Coordinate-wise median.
    Median,
    /// Coordinate-wise mean without the `f` lowest and `f` highest values.
    TrimmedMean,
    /// Multi-Krum: the mean of the `n − f` updates closest to their neighbours.
    MultiKrum,
    /// Every update clipped to the median norm, then Multi-Krum keeping the `n − f`
    /// best and also every update whose score is within 3 median absolute
    /// deviations of the median score, or at most twice it (the default: on a
    /// clean round no honest site is dropped just because Multi-Krum always drops `f`).
    ClipMultiKrum,
}

impl Rule {
    pub const ALL: [Rule; 5] = [Rule::Mean, Rule::Median, Rule::TrimmedMean, Rule::MultiKrum, Rule::ClipMultiKrum];

    pub fn name(self) -> &'static str {
        match self {
            Rule::Mean => "mean",
            Rule::Median => "median",
            Rule::TrimmedMean => "trimmed-mean",
            Rule::MultiKrum => "multi-krum",
            Rule::ClipMultiKrum => "clip-multi-krum",
        }
    }

    /// Parse a rule name (as [`Rule::name`]).
    pub fn parse(s: &str) -> Result<Rule, ModelError> {
        Rule::ALL.into_iter().find(|r| r.name() == s).ok_or_else(|| ModelError::Param {
            name: "rule",
            why: format!("`{s}` is not a rule; one of {}", Rule::ALL.map(Rule::name).join(", ")),
        })
    }
}

/// What a rule decided about one site's update: the provenance record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub site: usize,
    pub accepted: bool,
    /// The rule's score (Multi-Krum score, distance to the median, median AUC);
    /// NaN where there is none (JSON: null, read back as NaN).
    #[serde(deserialize_with = "nan_if_null")]
    pub score: f64,
    pub reason: String,
}

fn nan_if_null<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(<Option<f64> as serde::Deserialize>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// An aggregated vector and the decision on every site.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    pub value: Vec<f64>,
    pub decisions: Vec<Decision>,
}

/// The `f` Multi-Krum and the trimmed mean tolerate among `n` sites: ⌊(n − 3)/2⌋
/// (Krum's `n ≥ 2f + 3`), at most `cap`.
pub fn tolerated(n: usize, cap: usize) -> usize {
    (n.saturating_sub(3) / 2).min(cap)
}

fn dist2(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The bound of the histogram screens on the fraction of a site's normal rows
/// flagged: median + 3 MAD over the sites, and at least one half — a site most of
/// whose normal rows are called attacks. An honest site whose period or mix
/// differs can reach a few tens of percent (WUSTL's first validation period:
/// 0.1+), and excluding it loses exactly the normal traffic the threshold must
/// hold on.
pub(crate) fn flagged_bound(fractions: impl IntoIterator<Item = f64>) -> f64 {
    let (med, mad) = spread(fractions);
    (med + 3.0 * mad).max(0.5)
}

/// The chance a site flags `above` of its `normals` normal rows or more if its
/// rate were `bound` (binomial), when its fraction is above the bound and that
/// chance under `FLAGGED_P`; None otherwise. The fraction alone is not enough:
/// a site with 2 normal rows, both flagged, shows nothing (found with private
/// trees, where every site's normal rows mostly score above 0.5 and an honest
/// site of 2 normal rows was refused).
pub(crate) fn flagged(above: u64, normals: u64, bound: f64) -> Option<f64> {
    if normals == 0 || above as f64 / normals as f64 <= bound {
        return None;
    }
    let p = crate::metrics::binomial_sf(above, normals, bound.min(1.0));
    (p < FLAGGED_P).then_some(p)
}

/// How improbable (binomial, at the screen's bound) a site's count of flagged
/// normal rows must be before the histogram screens refuse it.
pub(crate) const FLAGGED_P: f64 = 0.01;

/// The median of `v` (sorted in place; the mean of the middle two when even).
pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { 0.5 * (v[n / 2 - 1] + v[n / 2]) }
}

/// The upper median of `v` and the upper median of the absolute deviations
/// from it (0, 0 when empty): the centre and spread the histogram and count
/// screens bound a site's score by.
pub(crate) fn spread(v: impl IntoIterator<Item = f64>) -> (f64, f64) {
    let mut v: Vec<f64> = v.into_iter().collect();
    v.sort_by(f64::total_cmp);
    let median = v.get(v.len() / 2).copied().unwrap_or(0.0);
    let mut dev: Vec<f64> = v.iter().map(|x| (x - median).abs()).collect();
    dev.sort_by(f64::total_cmp);
    (median, dev.get(dev.len() / 2).copied().unwrap_or(0.0))
}

fn mean_of(updates: &[&[f64]]) -> Vec<f64> {
    let d = updates[0].len();
    let mut m = vec![0.0; d];
    for u in updates {
        for (a, b) in m.iter_mut().zip(*u) {
            *a += b;
        }
    }
    let inv = 1.0 / updates.len() as f64;
    m.iter_mut().for_each(|a| *a *= inv);
    m
}

/// Multi-Krum scores (Blanchard et al.): for each update, the sum of squared
/// distances to its `n − f − 2` nearest other updates.
pub fn krum_scores(updates: &[&[f64]], f: usize) -> Vec<f64> {
    let n = updates.len();
    let k = n.saturating_sub(f + 2).max(1);
    (0..n)
        .map(|i| {
            let mut d: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| dist2(updates[i], updates[j])).collect();
            d.sort_by(f64::total_cmp);
            d.iter().take(k).sum()
        })
        .collect()
}

/// Aggregate one vector per site with `rule`, tolerating `f` bad sites.
pub fn aggregate(updates: &[Vec<f64>], rule: Rule, f: usize) -> Result<Aggregate, ModelError> {
    let n = updates.len();
    if n == 0 {
        return Err(ModelError::Data("no updates to aggregate".into()));
    }
    let d = updates[0].len();
    if let Some((i, u)) = updates.iter().enumerate().find(|(_, u)| u.len() != d) {
        return Err(ModelError::Data(format!("site {i} sent {} values, site 0 sent {d}", u.len())));
    }
    if let Some(i) = updates.iter().position(|u| u.iter().any(|x| !x.is_finite())) {
        return Err(ModelError::Data(format!("site {i} sent a non-finite value")));
    }
    let views: Vec<&[f64]> = updates.iter().map(Vec::as_slice).collect();
    let accept_all = |score: Vec<f64>, why: &str| -> Vec<Decision> {
        score.into_iter().enumerate().map(|(site, score)| Decision { site, accepted: true, score, reason: why.to_string() }).collect()
    };
    match rule {
        Rule::Mean => {
            let value = mean_of(&views);
            let scores = views.iter().map(|u| dist2(u, &value).sqrt()).collect();
            Ok(Aggregate { value, decisions: accept_all(scores, "mean: every update counts") })
        }
        Rule::Median | Rule::TrimmedMean => {
            let trim = if rule == Rule::Median { 0 } else { f.min((n - 1) / 2) };
            let mut value = vec![0.0; d];
            let mut col = vec![0.0; n];
            for (c, v) in value.iter_mut().enumerate() {
                for (x, u) in col.iter_mut().zip(&views) {
                    *x = u[c];
                }
                *v = if rule == Rule::Median {
                    median(&mut col)
                } else {
                    col.sort_by(f64::total_cmp);
                    let kept = &col[trim..n - trim];
                    kept.iter().sum::<f64>() / kept.len() as f64
                };
            }
            let scores = views.iter().map(|u| dist2(u, &value).sqrt()).collect();
            let why = if rule == Rule::Median { "coordinate-wise median" } else { "coordinate-wise trimmed mean" };
            Ok(Aggregate { value, decisions: accept_all(scores, why) })
        }
        Rule::MultiKrum | Rule::ClipMultiKrum => {
            let clipped: Vec<Vec<f64>>;
            let (views, clip_note): (Vec<&[f64]>, Option<f64>) = if rule == Rule::ClipMultiKrum {
                let mut norms: Vec<f64> = views.iter().map(|u| norm(u)).collect();
                let c = median(&mut norms);
                clipped = views.iter().map(|u| {
                    let s = norm(u);
                    if s > c && s > 0.0 { u.iter().map(|x| x * c / s).collect() } else { u.to_vec() }
                }).collect();
                (clipped.iter().map(Vec::as_slice).collect(), Some(c))
            } else {
                (views, None)
            };
            let f = f.min(n.saturating_sub(1));
            let scores = krum_scores(&views, f);
            let mut order: Vec<usize> = (0..n).collect();
            order.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
            let mut cutoff = scores[order[n - f - 1]];
            if rule == Rule::ClipMultiKrum {
                // Adaptive: also keep every update whose score is within 3 MAD of
                // the median score, or at most twice the median score (scores are
                // sums of squared distances: honest non-IID sites differ by that
                // much; the 3-MAD rule alone dropped CICIoMT's two most
                // normal-heavy of 10 clean sites at 1.8 × the median), so a clean
                // round excludes no honest site.
                let mut sc = scores.clone();
                let med = median(&mut sc);
                let mut dev: Vec<f64> = scores.iter().map(|s| (s - med).abs()).collect();
                cutoff = cutoff.max(med + 3.0 * median(&mut dev)).max(2.0 * med);
            }
            let keep: Vec<usize> = order.iter().copied().filter(|&i| scores[i] <= cutoff).collect();
            let value = mean_of(&keep.iter().map(|&i| views[i]).collect::<Vec<_>>());
            let decisions = (0..n)
                .map(|site| {
                    let accepted = keep.contains(&site);
                    let clip = clip_note.map(|c| format!(", clipped to the median norm {c:.4}")).unwrap_or_default();
                    let reason = if accepted {
                        format!("multi-krum: score {:.4} within the cut-off {cutoff:.4} (f = {f}){clip}", scores[site])
                    } else {
                        format!("multi-krum: score {:.4} above the cut-off {cutoff:.4} (f = {f}){clip}", scores[site])
                    };
                    Decision { site, accepted, score: scores[site], reason }
                })
                .collect();
            Ok(Aggregate { value, decisions })
        }
    }
}

/// Screen tree updates by how well each site's trees score on the other sites'
/// validation rows: `auc[i][j]` is the ROC-AUC of site `i`'s trees on site `j`'s
/// rows (`None` where `j == i` or site `j` has rows of one class only). A site is
/// accepted when the median of its AUCs is above 0.5 and not more than 3 median
/// absolute deviations (at least 0.1) below the median of all sites' medians.
/// When that median is itself at most 0.55 the screen is inconclusive and
/// accepts every site.
pub fn screen_by_auc(auc: &[Vec<Option<f64>>]) -> Vec<Decision> {
    let meds: Vec<Option<f64>> = auc
        .iter()
        .map(|row| {
            let mut v: Vec<f64> = row.iter().flatten().copied().collect();
            (!v.is_empty()).then(|| median(&mut v))
        })
        .collect();
    let mut all: Vec<f64> = meds.iter().flatten().copied().collect();
    let center = if all.is_empty() { 0.5 } else { median(&mut all) };
    let mut dev: Vec<f64> = meds.iter().flatten().map(|m| (m - center).abs()).collect();
    // A floor on the spread (0.1, so 0.3 below the median is always tolerated):
    // a site whose rows are mostly one class grows weaker trees honestly (0.84
    // against the others' 0.99 on CICIoMT at α = 0.5) and still adds signal, the
    // normal traffic most of all; what the screen must stop is trees that are no
    // better, or worse, than chance.
    let mad = if dev.is_empty() { 0.0 } else { median(&mut dev) }.max(0.1);
    let floor = center - 3.0 * mad;
    // When the sites' models are typically no better than chance on each other's
    // rows (an LSTM after its first local epochs), the screen cannot tell a bad
    // site from the rest: it accepts every site and says so, leaving it to the rule.
    let inconclusive = center <= 0.55;
    meds.iter()
        .enumerate()
        .map(|(site, m)| match m {
            None => Decision { site, accepted: false, score: f64::NAN, reason: "no other site could score its trees".into() },
            Some(m) if inconclusive => Decision { site, accepted: true, score: *m, reason: format!("median AUC {m:.4}; screen inconclusive (the sites' median {center:.4} is near chance)") },
            Some(m) if *m <= 0.5 => Decision { site, accepted: false, score: *m, reason: format!("median AUC {m:.4} on the other sites' rows is no better than chance") },
            Some(m) if *m < floor => Decision {
                site,
                accepted: false,
                score: *m,
                reason: format!("median AUC {m:.4} below {floor:.4} (median {center:.4} − 3 × MAD {mad:.4})"),
            },
            Some(m) => Decision { site, accepted: true, score: *m, reason: format!("median AUC {m:.4} on the other sites' rows") },
        })
        .collect()
}

/// Evaluating sites a class needs before a site's models are judged on it.
pub const MIN_CLASS_EVALUATORS: usize = 3;

/// An overall median AUC below this is evidence of inverted labels, not just a
/// weak model: a site's trees rank attacks clearly *below* normal traffic.
/// Trees that learned nothing score 0.5 (an honest site of one class only:
/// CICIoMT at α = 0.1), an honest weak site 0.55–0.65; inverted labels gave
/// 0.01–0.11 (`cic10-invert`).
pub const WRONG_LABELS_AUC: f64 = 0.35;

/// The per-class screen: `auc[i][j][c]` is the AUC of site `i`'s model on site
/// `j`'s rows of class `c` against its normal rows (`None` where `j == i` or site
/// `j` has too few of either). A site is flagged on class `c` when the median of
/// its AUCs there (over at least [`MIN_CLASS_EVALUATORS`] sites) is below 0.5 —
/// its model ranks that attack no higher than the normal traffic of the sites
/// that hold it — and more than 3 median absolute deviations (at least 0.1)
/// below the median over all sites (the caller takes it as evidence only for a
/// site whose model is otherwise sound: one relabelled class). That is what a
/// site that relabelled an attack class as normal looks like (the targeted
/// flip); an honest site that never saw the class ranks it near or above chance.
/// Returns, per site, why it is flagged (the worst class), or `None`.
pub fn screen_by_class(auc: &[Vec<Vec<Option<f64>>>], classes: &[String]) -> Vec<Option<String>> {
    let n = auc.len();
    let mut worst: Vec<Option<(f64, String)>> = vec![None; n];
    for (c, name) in classes.iter().enumerate().skip(1) {
        let meds: Vec<Option<(f64, usize)>> = auc
            .iter()
            .map(|row| {
                let mut v: Vec<f64> = row.iter().filter_map(|a| a.get(c).copied().flatten()).collect();
                (v.len() >= MIN_CLASS_EVALUATORS).then(|| (median(&mut v), v.len()))
            })
            .collect();
        let mut all: Vec<f64> = meds.iter().flatten().map(|m| m.0).collect();
        if all.len() < MIN_CLASS_EVALUATORS {
            continue;
        }
        let center = median(&mut all);
        let mut dev: Vec<f64> = meds.iter().flatten().map(|m| (m.0 - center).abs()).collect();
        let floor = center - 3.0 * median(&mut dev).max(0.1);
        for (i, m) in meds.iter().enumerate() {
            if let Some((m, k)) = *m {
                if m < 0.5 && m < floor && worst[i].as_ref().is_none_or(|w| m < w.0) {
                    worst[i] = Some((m, format!("its model ranks {name} below normal traffic at the {k} other sites that hold both (median AUC {m:.4}; the sites' median {center:.4}): that class looks relabelled as normal")));
                }
            }
        }
    }
    worst.into_iter().map(|w| w.map(|w| w.1)).collect()
}

#[cfg(test)]
#[path = "robust_tests.rs"]
mod tests;
