//! Detection-quality figures: confusion counts, detection rate, FPR, precision, F1,
//! ROC-AUC, PR-AUC (average precision), curves for plots, multi-class confusion.

use serde::{Deserialize, Serialize};

/// Binary figures at one threshold (`score >= threshold` = attack).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Binary {
    pub threshold: f64,
    pub tp: u64,
    pub fp: u64,
    pub tn: u64,
    #[serde(rename = "fn")]
    pub fn_: u64,
    /// Detection rate (recall on attacks).
    pub detection_rate: f64,
    pub fpr: f64,
    pub precision: f64,
    pub f1: f64,
    pub roc_auc: f64,
    pub pr_auc: f64,
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Figures of `scores` against labels `y` at `threshold`.
pub fn binary(scores: &[f64], y: &[bool], threshold: f64) -> Binary {
    assert_eq!(scores.len(), y.len(), "scores and labels differ in length");
    let (mut tp, mut fp, mut tn, mut fn_) = (0, 0, 0, 0);
    for (&s, &l) in scores.iter().zip(y) {
        match (s >= threshold, l) {
            (true, true) => tp += 1,
            (true, false) => fp += 1,
            (false, false) => tn += 1,
            (false, true) => fn_ += 1,
        }
    }
    let precision = ratio(tp, tp + fp);
    let recall = ratio(tp, tp + fn_);
    let f1 = if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
    Binary {
        threshold,
        tp,
        fp,
        tn,
        fn_,
        detection_rate: recall,
        fpr: ratio(fp, fp + tn),
        precision,
        f1,
        roc_auc: roc_auc(scores, y),
        pr_auc: average_precision(scores, y),
    }
}

/// Indices sorted by descending score (ties by index, deterministic).
fn order_desc(scores: &[f64]) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    idx
}

/// Area under the ROC curve (ties count one half). 0.5 when one class is absent.
pub fn roc_auc(scores: &[f64], y: &[bool]) -> f64 {
    let pos = y.iter().filter(|&&l| l).count() as f64;
    let neg = y.len() as f64 - pos;
    if pos == 0.0 || neg == 0.0 {
        return 0.5;
    }
    // Mann-Whitney U with average ranks for ties.
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]));
    let mut rank_sum = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && scores[idx[j + 1]] == scores[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            if y[k] {
                rank_sum += avg;
            }
        }
        i = j + 1;
    }
    (rank_sum - pos * (pos + 1.0) / 2.0) / (pos * neg)
}

/// Average precision (area under the precision-recall curve, step-wise).
pub fn average_precision(scores: &[f64], y: &[bool]) -> f64 {
    let pos = y.iter().filter(|&&l| l).count();
    if pos == 0 {
        return 0.0;
    }
    let idx = order_desc(scores);
    let (mut tp, mut fp, mut ap) = (0u64, 0u64, 0.0);
    let mut i = 0;
    while i < idx.len() {
        // Treat tied scores as one threshold.
        let mut j = i;
        let (mut dtp, mut dfp) = (0, 0);
        while j < idx.len() && scores[idx[j]] == scores[idx[i]] {
            if y[idx[j]] {
                dtp += 1;
            } else {
                dfp += 1;
            }
            j += 1;
        }
        tp += dtp;
        fp += dfp;
        if dtp > 0 {
            ap += (dtp as f64 / pos as f64) * (tp as f64 / (tp + fp) as f64);
        }
        i = j;
    }
    ap
}

/// ROC curve points (fpr, tpr), from (0,0) to (1,1), at most ~`max_points`.
pub fn roc_curve(scores: &[f64], y: &[bool], max_points: usize) -> Vec<(f64, f64)> {
    curve(scores, y, max_points, |tp, fp, pos, neg| (ratio(fp, neg), ratio(tp, pos)))
}

/// Precision-recall curve points (recall, precision).
pub fn pr_curve(scores: &[f64], y: &[bool], max_points: usize) -> Vec<(f64, f64)> {
    curve(scores, y, max_points, |tp, fp, pos, _| (ratio(tp, pos), if tp + fp == 0 { 1.0 } else { ratio(tp, tp + fp) }))
}

fn curve(scores: &[f64], y: &[bool], max_points: usize, f: impl Fn(u64, u64, u64, u64) -> (f64, f64)) -> Vec<(f64, f64)> {
    let pos = y.iter().filter(|&&l| l).count() as u64;
    let neg = y.len() as u64 - pos;
    let idx = order_desc(scores);
    let step = (idx.len() / max_points.max(1)).max(1);
    let (mut tp, mut fp) = (0u64, 0u64);
    let mut out = vec![f(0, 0, pos, neg)];
    for (k, &i) in idx.iter().enumerate() {
        if y[i] {
            tp += 1;
        } else {
            fp += 1;
        }
        let last = k + 1 == idx.len();
        let tie_next = !last && scores[idx[k + 1]] == scores[i];
        if last || (!tie_next && (k + 1) % step == 0) {
            out.push(f(tp, fp, pos, neg));
        }
    }
    out
}

/// The threshold for a false-positive rate of `target_fpr`, set conformally on the
/// normal rows' scores: with `n` of them, it lies just above the `k`-th highest, where
/// `k = ⌊target·(n+1)⌋` (at least 1). For a new normal event exchangeable with them,
/// P(score ≥ threshold) = (k−1+1)/(n+1) ≤ target: the expected test FPR holds the
/// target even when `n` is small, where "allow ⌊target·n⌋ of them" (what this did
/// before) overshoots by up to 1/n. See [`fpr_interval`] for its spread.
pub fn threshold_for_fpr(normal_scores: &[f64], target_fpr: f64) -> f64 {
    if normal_scores.is_empty() {
        return 0.5;
    }
    let mut s: Vec<f64> = normal_scores.to_vec();
    s.sort_by(|a, b| b.total_cmp(a));
    let n = s.len();
    let k = ((target_fpr * (n + 1) as f64).floor() as usize).clamp(1, n);
    // Scores >= threshold are attacks: just above the k-th highest normal score,
    // so k - 1 of them (ties aside) are at or above it.
    next_up(s[k - 1])
}

/// The false-positive rate a threshold will have on new normal events, given that
/// `above` of `n` calibration normal scores lie at or above it: under
/// exchangeability it is Beta(above + 1, n − above) distributed. Returns its mean
/// and central `level` interval (e.g. 0.9 → 5th and 95th percentiles).
pub fn fpr_interval(above: usize, n: usize, level: f64) -> (f64, f64, f64) {
    let (a, b) = (above as f64 + 1.0, (n - above.min(n)) as f64);
    if b <= 0.0 {
        return (1.0, 1.0, 1.0);
    }
    let mean = a / (a + b);
    let tail = (1.0 - level) / 2.0;
    (mean, beta_quantile(above + 1, n - above, tail), beta_quantile(above + 1, n - above, 1.0 - tail))
}

/// P(X ≥ x) for X ~ Binomial(n, p).
pub fn binomial_sf(x: u64, n: u64, p: f64) -> f64 {
    match x {
        0 => 1.0,
        x if x > n => 0.0,
        x => beta_cdf(x as usize, (n - x + 1) as usize, p),
    }
}

/// P(Beta(a, b) ≤ x) for integers a, b ≥ 1: P(Binomial(a+b−1, x) ≥ a).
fn beta_cdf(a: usize, b: usize, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let m = a + b - 1;
    let (lx, l1x) = (x.ln(), (1.0 - x).ln());
    // Σ_{j=a}^{m} C(m, j) x^j (1-x)^(m-j), in log space.
    let mut log_c = 0.0f64; // ln C(m, 0)
    let mut total = 0.0f64;
    for j in 0..=m {
        if j > 0 {
            log_c += ((m - j + 1) as f64).ln() - (j as f64).ln();
        }
        if j >= a {
            total += (log_c + j as f64 * lx + (m - j) as f64 * l1x).exp();
        }
    }
    total.min(1.0)
}

/// The `q` quantile of Beta(a, b) (integers ≥ 1), by bisection.
fn beta_quantile(a: usize, b: usize, q: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if beta_cdf(a, b, mid) < q {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    (lo + hi) / 2.0
}

/// The decision threshold learned from validation scores: [`threshold_for_fpr`]
/// bounds it from below (the target FPR); when the attack scores leave a gap above
/// that bound, the threshold moves to the middle of the gap, up to the lowest attack
/// score above the bound. The same attacks are detected on validation, with a margin
/// on both sides instead of the whole false-positive budget spent where the scores
/// separate (a capture whose test rows drift then keeps its FPR low).
pub fn calibrate_threshold(normal_scores: &[f64], attack_scores: &[f64], target_fpr: f64) -> f64 {
    let lo = threshold_for_fpr(normal_scores, target_fpr);
    let hi = attack_scores.iter().copied().filter(|&s| s >= lo).fold(f64::INFINITY, f64::min);
    if hi.is_finite() {
        lo + (hi - lo) / 2.0
    } else {
        lo
    }
}

/// [`calibrate_threshold`] on labelled scores (`true` = attack).
pub fn calibrate_labelled(scores: impl IntoIterator<Item = (f64, bool)>, target_fpr: f64) -> f64 {
    let (attack, normal): (Vec<(f64, bool)>, Vec<(f64, bool)>) = scores.into_iter().partition(|&(_, y)| y);
    let strip = |v: Vec<(f64, bool)>| -> Vec<f64> { v.into_iter().map(|(s, _)| s).collect() };
    calibrate_threshold(&strip(normal), &strip(attack), target_fpr)
}

fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        return x;
    }
    if x == 0.0 {
        return f64::from_bits(1);
    }
    let b = x.to_bits();
    f64::from_bits(if x > 0.0 { b + 1 } else { b - 1 })
}

/// Multi-class figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiClass {
    pub classes: Vec<String>,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<u64>>,
    pub recall: Vec<f64>,
    pub precision: Vec<f64>,
    pub f1: Vec<f64>,
    pub macro_f1: f64,
    pub accuracy: f64,
}

/// Confusion matrix and per-class figures; classes absent from both truth and
/// prediction are left out of the macro average.
pub fn multiclass(truth: &[usize], pred: &[usize], classes: &[String]) -> MultiClass {
    let k = classes.len();
    let mut cm = vec![vec![0u64; k]; k];
    for (&t, &p) in truth.iter().zip(pred) {
        cm[t][p] += 1;
    }
    let mut recall = vec![0.0; k];
    let mut precision = vec![0.0; k];
    let mut f1 = vec![0.0; k];
    let (mut sum, mut present) = (0.0, 0);
    for c in 0..k {
        let tp = cm[c][c];
        let row: u64 = cm[c].iter().sum();
        let col: u64 = (0..k).map(|r| cm[r][c]).sum();
        recall[c] = ratio(tp, row);
        precision[c] = ratio(tp, col);
        f1[c] = if recall[c] + precision[c] > 0.0 { 2.0 * recall[c] * precision[c] / (recall[c] + precision[c]) } else { 0.0 };
        if row + col > 0 {
            sum += f1[c];
            present += 1;
        }
    }
    let correct: u64 = (0..k).map(|c| cm[c][c]).sum();
    MultiClass {
        classes: classes.to_vec(),
        confusion: cm,
        recall,
        precision,
        f1,
        macro_f1: if present == 0 { 0.0 } else { sum / present as f64 },
        accuracy: ratio(correct, truth.len() as u64),
    }
}

/// The law of a threshold's false-positive rate, from its calibration rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FprInterval {
    /// Normal calibration rows, and how many of them score at or above the threshold.
    pub normals: usize,
    pub above: usize,
    pub expected: f64,
    pub low: f64,
    pub high: f64,
    /// Central probability of [low, high].
    pub level: f64,
}

impl FprInterval {
    pub fn of(normal_scores: &[f64], threshold: f64, level: f64) -> FprInterval {
        FprInterval::from_counts(normal_scores.iter().filter(|&&s| s >= threshold).count(), normal_scores.len(), level)
    }

    /// The law from `above` of `normals` calibration rows at or above the threshold.
    pub fn from_counts(above: usize, normals: usize, level: f64) -> FprInterval {
        let (expected, low, high) = fpr_interval(above, normals, level);
        FprInterval { normals, above, expected, low, high, level }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auc_of_perfect_random_and_inverted_rankings() {
        let y = [false, false, true, true];
        assert_eq!(roc_auc(&[0.1, 0.2, 0.8, 0.9], &y), 1.0);
        assert_eq!(roc_auc(&[0.9, 0.8, 0.2, 0.1], &y), 0.0);
        assert_eq!(roc_auc(&[0.5, 0.5, 0.5, 0.5], &y), 0.5);
        assert!((average_precision(&[0.1, 0.2, 0.8, 0.9], &y) - 1.0).abs() < 1e-12);
        // one positive ranked first, one last: AP = (1/2)(1) + (1/2)(2/4)
        assert!((average_precision(&[0.9, 0.5, 0.4, 0.1], &[true, false, false, true]) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn confusion_counts_and_rates() {
        let b = binary(&[0.9, 0.1, 0.7, 0.3, 0.6], &[true, true, false, false, true], 0.5);
        assert_eq!((b.tp, b.fp, b.tn, b.fn_), (2, 1, 1, 1));
        assert!((b.detection_rate - 2.0 / 3.0).abs() < 1e-12);
        assert!((b.fpr - 0.5).abs() < 1e-12);
        assert!((b.precision - 2.0 / 3.0).abs() < 1e-12);
    }

    #[test]
    fn fpr_threshold_admits_at_most_the_target_share() {
        let normal: Vec<f64> = (0..1000).map(|i| f64::from(i) / 1000.0).collect();
        for target in [0.0, 0.001, 0.01, 0.05] {
            let t = threshold_for_fpr(&normal, target);
            let fp = normal.iter().filter(|&&s| s >= t).count();
            assert!(fp as f64 <= target * 1000.0, "target {target}: {fp} false positives");
        }
    }

    #[test]
    fn the_conformal_threshold_holds_its_target_on_new_normal_rows_when_calibration_is_small() {
        // 200 calibration rows, target 1 %: averaged over many draws, the share of
        // new normal rows at or above the threshold stays at or below 1 % (the old
        // rule, ⌊0.01·200⌋ = 2 allowed above, averages 3/201 ≈ 1.5 %).
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let (mut fpr, draws) = (0.0, 400);
        for _ in 0..draws {
            let cal: Vec<f64> = (0..200).map(|_| rng.random::<f64>()).collect();
            let t = threshold_for_fpr(&cal, 0.01);
            fpr += (1.0 - t).max(0.0); // uniform scores: P(new >= t)
        }
        let mean = fpr / f64::from(draws);
        assert!(mean <= 0.0105 && mean > 0.007, "mean test FPR {mean}");
    }

    #[test]
    fn binomial_tail() {
        assert_eq!(binomial_sf(0, 10, 0.1), 1.0);
        assert_eq!(binomial_sf(11, 10, 0.1), 0.0);
        assert!((binomial_sf(1, 10, 0.1) - (1.0 - 0.9f64.powi(10))).abs() < 1e-12);
        assert!((binomial_sf(10, 10, 0.1) - 1e-10).abs() < 1e-20);
        // 12 of 379 where 1 % is expected (3.8): about 4e-4.
        let p = binomial_sf(12, 379, 0.01);
        assert!((2e-4..8e-4).contains(&p), "{p}");
    }

    #[test]
    fn fpr_interval_is_the_beta_law_of_the_threshold() {
        let (mean, lo, hi) = fpr_interval(9, 999, 0.9);
        assert!((mean - 0.01).abs() < 1e-12);
        // Beta(10, 990): 5th and 95th percentiles ≈ 0.0055 and 0.0157.
        assert!((lo - 0.0055).abs() < 0.0004 && (hi - 0.0157).abs() < 0.0005, "{lo} {hi}");
        assert!((beta_cdf(1, 1, 0.3) - 0.3).abs() < 1e-12);
    }

    #[test]
    fn calibrated_threshold_sits_between_the_fpr_bound_and_the_attacks() {
        let normal: Vec<f64> = (0..100).map(|i| f64::from(i) / 200.0).collect(); // 0 .. 0.495
        let attack = [0.9, 0.95, 0.3];
        let t = calibrate_threshold(&normal, &attack, 0.01);
        let lo = threshold_for_fpr(&normal, 0.01);
        assert!(t > lo && t < 0.9, "{lo} < {t} < 0.9");
        assert!(normal.iter().filter(|&&s| s >= t).count() <= 1);
        // No attack above the bound: the bound itself.
        assert_eq!(calibrate_threshold(&normal, &[0.1], 0.01), lo);
    }

    #[test]
    fn macro_f1_over_present_classes() {
        let classes: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let m = multiclass(&[0, 0, 1, 1], &[0, 0, 1, 0], &classes);
        assert_eq!(m.confusion[1][0], 1);
        assert!((m.recall[1] - 0.5).abs() < 1e-12);
        // c absent from both: macro over a and b only
        let f1a = 2.0 * (2.0 / 3.0) / (1.0 + 2.0 / 3.0);
        let f1b = 2.0 * 0.5 / 1.5;
        assert!((m.macro_f1 - (f1a + f1b) / 2.0).abs() < 1e-12);
    }
}
